"""TLS to MinIO (REACTOR_MINIO_SECURE, REACTOR_MINIO_CA_FILE) against a second MinIO that serves HTTPS
with a certificate from a private CA made for this module.

The session's MinIO stays plain HTTP; this one has no webhook target, so the reactor finds uploads
through the listen stream and the reconcile sweep, both over TLS.
"""

from __future__ import annotations

import os
import shutil
import signal
import ssl
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme
import urllib3
from minio import Minio

from reactor.devstack import MinioServer, StackError, minio_binary, terminate
from tests.support.e2e import (
    history,
    keys,
    nudging,
    put,
    sha256_of,
    wait_for,
    wait_listening,
    wait_settled,
    write_rules,
)
from tests.support.stack import BucketNames, ReactorSpawner, base_env, run_cli


class TlsMinio(MinioServer):
    """A MinioServer whose certs dir holds public.crt and private.key, so it serves HTTPS only.

    MinioServer already passes --certs-dir; what it cannot do is check readiness or hand out a
    client over HTTPS, so those two are overridden here.
    """

    def __init__(self, root: Path, ca_file: Path, *, check_hostname: bool = True) -> None:
        super().__init__(minio_binary(), root / "data", log_path=root / "minio.log")
        self.ca_file = ca_file
        self.check_hostname = check_hostname  # False only for a certificate made not to name 127.0.0.1

    @property
    def url(self) -> str:
        return f"https://{self.endpoint}"

    def client(self, *, timeout: float = 30.0, retries: int = 2) -> Minio:
        http = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=5.0, read=timeout),
            retries=urllib3.Retry(total=retries, backoff_factor=0.2, status_forcelist=[500, 502, 503, 504]),
            cert_reqs="CERT_REQUIRED",
            ca_certs=str(self.ca_file),
        )
        return Minio(
            self.endpoint,
            access_key=self.access_key,
            secret_key=self.secret_key,
            secure=True,
            http_client=http,
        )

    def _wait_ready(self) -> None:
        proc = self._proc
        if proc is None:
            raise StackError("internal: _wait_ready without a process")
        context = ssl.create_default_context(cafile=str(self.ca_file))
        context.check_hostname = self.check_hostname
        deadline = time.monotonic() + self.start_timeout
        for path in ("/minio/health/live", "/minio/health/cluster"):
            while _https_status(self.url + path, context) != 200:
                if proc.poll() is not None:
                    terminate(proc, signal.SIGKILL, 1.0)
                    self._proc = None
                    raise StackError(f"TLS MinIO exited with code {proc.returncode}; see {self.log_path}")
                if time.monotonic() > deadline:
                    self.kill()
                    raise StackError(
                        f"TLS MinIO was not ready within {self.start_timeout:.0f}s; {self.log_path}"
                    )
                time.sleep(0.05)


def _https_status(url: str, context: ssl.SSLContext) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=1.0, context=context) as response:  # noqa: S310 - https
            return int(response.status)
    except urllib.error.HTTPError as exc:
        exc.close()
        return int(exc.code)
    except (OSError, ValueError):
        return None


def start_tls_minio(root: Path, ca: trustme.CA, *names: str) -> TlsMinio:
    """A TLS MinIO whose certificate, signed by ca, names exactly `names`."""
    ca_file = root / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    server = TlsMinio(root / "minio", ca_file, check_hostname="127.0.0.1" in names)
    cert = ca.issue_cert(*names)
    server.certs_dir.mkdir(parents=True, exist_ok=True)
    cert.private_key_pem.write_to_path(str(server.certs_dir / "private.key"))
    # public.crt: the leaf first, then any intermediates (trustme issues straight from the root)
    (server.certs_dir / "public.crt").write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
    server.start()
    return server


@dataclass(frozen=True)
class Tls:
    server: TlsMinio
    ca_file: Path  # the CA that signed the server's certificate
    other_ca_file: Path  # a CA that did not
    root: Path


@pytest.fixture(scope="module")
def tls() -> Iterator[Tls]:
    """One HTTPS MinIO for this module; its certificate names 127.0.0.1 and localhost."""
    root = Path(tempfile.mkdtemp(prefix="reactor-tls-"))
    other_ca_file = root / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(other_ca_file))
    server: TlsMinio | None = None
    try:
        server = start_tls_minio(root, trustme.CA(), "127.0.0.1", "localhost")
        yield Tls(server=server, ca_file=server.ca_file, other_ca_file=other_ca_file, root=root)
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(root, ignore_errors=True)


def tls_env(
    tls: Tls, *, rules: Path, ca_file: Path | None, secure: bool = True, **extra: str
) -> dict[str, str]:
    """The CLI's environment for the TLS MinIO; the database is never reached by `setup`."""
    env = base_env()
    env.update(
        REACTOR_DATABASE_URL="postgresql://nobody@127.0.0.1:1/unused",
        REACTOR_MINIO_ENDPOINT=tls.server.endpoint,
        REACTOR_MINIO_ACCESS_KEY=tls.server.access_key,
        REACTOR_MINIO_SECRET_KEY=tls.server.secret_key,
        REACTOR_MINIO_SECURE="true" if secure else "false",
        REACTOR_RULES=str(rules),
        REACTOR_LOG_LEVEL="DEBUG",
    )
    if ca_file is not None:
        env["REACTOR_MINIO_CA_FILE"] = str(ca_file)
    env.update(extra)
    return env


def rules_file(path: Path, src: str, dst: str) -> Path:
    return write_rules(
        path,
        {
            "name": "alerts",
            "source_bucket": src,
            "pattern": "{task_type}/{task_id}/{filename}",
            "target_bucket": dst,
            "target": "{task_type}/{task_id}/{filename}",
            "order_key": "{task_id}",
        },
    )


def test_objects_move_over_tls_with_a_private_ca(
    tls: Tls, tmp_path: Path, database_url: str, buckets: BucketNames, spawn_reactor: ReactorSpawner
) -> None:
    # Given `reactor setup` over TLS, trusting the private CA through REACTOR_MINIO_CA_FILE
    src, dst = buckets("tls-img"), buckets("tls-alr")
    rules = rules_file(tmp_path / "rules.toml", src, dst)
    setup = run_cli(["setup"], env=tls_env(tls, rules=rules, ca_file=tls.ca_file), check=True)
    assert f"created bucket {src}" in setup.stdout
    client = tls.server.client()
    assert client.bucket_exists(src)
    assert client.bucket_exists(dst)
    # And a reactor that listens and sweeps over TLS (this MinIO has no webhook to it)
    reactor = spawn_reactor(
        database_url=database_url,
        rules_path=rules,
        env={
            "REACTOR_MINIO_ENDPOINT": tls.server.endpoint,
            "REACTOR_MINIO_ACCESS_KEY": tls.server.access_key,
            "REACTOR_MINIO_SECRET_KEY": tls.server.secret_key,
            "REACTOR_MINIO_SECURE": "true",
            "REACTOR_MINIO_CA_FILE": str(tls.ca_file),
            "REACTOR_NOTIFY_ARN": "",
            "REACTOR_LISTEN": "true",
            "REACTOR_RECONCILE_INTERVAL": "1",
            "REACTOR_RECONCILE_GRACE": "0",
        },
    )
    wait_listening(client, src, reactor.log_text)
    # When uploads arrive, one of them multipart (verified by streaming its bytes over TLS)
    digests = {
        f"detect/t{i % 3}/{i:02d}.jpg": put(client, src, f"detect/t{i % 3}/{i:02d}.jpg", os.urandom(2048 + i))
        for i in range(12)
    }
    digests["video/t9/clip.mp4"] = put(
        client, src, "video/t9/clip.mp4", os.urandom(11 * 1024 * 1024), part_size=5 * 1024 * 1024
    )
    with nudging(client, src):
        rows = wait_settled(database_url, len(digests), timeout=60)
    # Then every upload is at its target with the same bytes, and every source is gone
    assert {r["status"] for r in rows} == {"done"}, rows
    assert sorted(r["source_key"] for r in rows) == sorted(digests)
    for key, digest in digests.items():
        assert sha256_of(client, dst, key) == digest, key
    assert keys(client, src) == []
    assert {r["via"] for r in history(database_url)} <= {"listen", "sweep"}
    log = reactor.log_text()
    for problem in ("Traceback", "reconcile_failed", "listen_disconnected", "retry_scheduled"):
        assert problem not in log, problem


def test_setup_with_the_wrong_ca_fails_naming_the_setting(
    tls: Tls, tmp_path: Path, buckets: BucketNames
) -> None:
    rules = rules_file(tmp_path / "rules.toml", buckets("tls-img"), buckets("tls-alr"))
    result = run_cli(["setup"], env=tls_env(tls, rules=rules, ca_file=tls.other_ca_file), timeout=60)
    assert result.returncode == 1, result
    assert "Traceback" not in result.stderr
    line = result.stderr.strip()
    assert len(line.splitlines()) == 1, line
    assert line.startswith("reactor: error: cannot verify the TLS certificate of MinIO at 127.0.0.1:")
    assert "unable to get local issuer certificate" in line
    assert "REACTOR_MINIO_CA_FILE does not hold the CA that signed MinIO's certificate" in line


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        pytest.param("no CA file", "a certificate from a private CA needs REACTOR_MINIO_CA_FILE", id="no-ca"),
        pytest.param("plain HTTP client", "serves HTTPS but REACTOR_MINIO_SECURE is not true", id="plain"),
    ],
)
def test_other_tls_mismatches_say_what_to_change(
    tls: Tls, tmp_path: Path, buckets: BucketNames, case: str, expected: str
) -> None:
    rules = rules_file(tmp_path / "rules.toml", buckets("tls-img"), buckets("tls-alr"))
    env = tls_env(tls, rules=rules, ca_file=None, secure=case != "plain HTTP client")
    result = run_cli(["setup"], env=env, timeout=60)
    assert result.returncode == 1, result
    assert "Traceback" not in result.stderr
    assert expected in result.stderr


def test_tls_to_a_server_without_tls_says_it_does_not_speak_tls(
    tls: Tls, tmp_path: Path, buckets: BucketNames
) -> None:
    server = MinioServer(
        minio_binary(), tmp_path / "plain" / "data", log_path=tmp_path / "plain" / "minio.log"
    )
    server.start()
    try:
        rules = rules_file(tmp_path / "rules.toml", buckets("tls-img"), buckets("tls-alr"))
        env = tls_env(tls, rules=rules, ca_file=tls.ca_file, REACTOR_MINIO_ENDPOINT=server.endpoint)
        result = run_cli(["setup"], env=env, timeout=60)
    finally:
        server.stop()
    assert result.returncode == 1, result
    assert "Traceback" not in result.stderr
    assert "does not seem to speak TLS" in result.stderr
    assert "REACTOR_MINIO_SECURE=false" in result.stderr


def test_a_certificate_that_does_not_name_the_endpoint_says_so(
    tls: Tls, tmp_path: Path, buckets: BucketNames
) -> None:
    # Given a MinIO whose certificate, from a trusted CA, names localhost but not 127.0.0.1
    server = start_tls_minio(tmp_path, trustme.CA(), "localhost")
    try:
        rules = rules_file(tmp_path / "rules.toml", buckets("tls-img"), buckets("tls-alr"))
        env = tls_env(tls, rules=rules, ca_file=server.ca_file, REACTOR_MINIO_ENDPOINT=server.endpoint)
        result = run_cli(["setup"], env=env, timeout=60)
    finally:
        server.stop()
    assert result.returncode == 1, result
    assert "Traceback" not in result.stderr
    assert "IP address mismatch, certificate is not valid for '127.0.0.1'" in result.stderr
    assert "Reach MinIO by a name or address the certificate lists (REACTOR_MINIO_ENDPOINT)" in result.stderr


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        pytest.param(
            "missing", "REACTOR_MINIO_CA_FILE cannot be read (No such file or directory)", id="missing"
        ),
        pytest.param(
            "not a certificate", "REACTOR_MINIO_CA_FILE holds no usable PEM CA certificate", id="not-pem"
        ),
        pytest.param(
            "without secure",
            "REACTOR_MINIO_CA_FILE is set but REACTOR_MINIO_SECURE is not true",
            id="not-secure",
        ),
    ],
)
def test_an_unusable_ca_file_is_a_configuration_error(
    tls: Tls, tmp_path: Path, buckets: BucketNames, case: str, expected: str
) -> None:
    rules = rules_file(tmp_path / "rules.toml", buckets("tls-img"), buckets("tls-alr"))
    ca_file = tls.ca_file
    if case == "missing":
        ca_file = tmp_path / "nowhere" / "ca.pem"
    elif case == "not a certificate":
        ca_file = tmp_path / "ca.pem"
        ca_file.write_text("not a certificate\n")
    env = tls_env(tls, rules=rules, ca_file=ca_file, secure=case != "without secure")
    result = run_cli(["setup"], env=env, timeout=60)
    assert result.returncode == 2, result
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("reactor: configuration error: ")
    assert expected in result.stderr
    assert str(ca_file) not in result.stderr  # settings are named, their values never printed


def test_a_running_reactor_with_the_wrong_ca_logs_the_cause_and_keeps_running(
    tls: Tls, tmp_path: Path, database_url: str, buckets: BucketNames, spawn_reactor: ReactorSpawner
) -> None:
    src, dst = buckets("tls-img"), buckets("tls-alr")
    rules = rules_file(tmp_path / "rules.toml", src, dst)
    run_cli(["setup"], env=tls_env(tls, rules=rules, ca_file=tls.ca_file), check=True)
    reactor = spawn_reactor(
        database_url=database_url,
        rules_path=rules,
        env={
            "REACTOR_MINIO_ENDPOINT": tls.server.endpoint,
            "REACTOR_MINIO_ACCESS_KEY": tls.server.access_key,
            "REACTOR_MINIO_SECRET_KEY": tls.server.secret_key,
            "REACTOR_MINIO_SECURE": "true",
            "REACTOR_MINIO_CA_FILE": str(tls.other_ca_file),
            "REACTOR_NOTIFY_ARN": "",
            "REACTOR_LISTEN": "true",
            "REACTOR_RECONCILE_INTERVAL": "1",
            "REACTOR_RECONCILE_GRACE": "0",
        },
    )
    put(tls.server.client(), src, "detect/t1/a.jpg", b"a")
    wait_for(
        lambda: (
            reactor.log_text().count('"event": "reconcile_failed"') >= 2
            and '"event": "listen_disconnected"' in reactor.log_text()
        ),
        timeout=30,
        what="a failed sweep and a failed listen attempt",
    )
    text = reactor.log_text()
    assert "REACTOR_MINIO_CA_FILE does not hold the CA that signed MinIO's certificate" in text
    assert reactor.alive
    assert "Traceback" not in text
    assert history(database_url) == []
