"""Secure defaults on a real reactor process: who may bind where, and secrets that never come out.

The refusal of a non-loopback bind without a token is in test_failures.py
(test_cli_reports_bad_configuration_clearly); here is the way out of it, and what the reactor says.
Only 127.0.0.1 is ever connected to: a bind on 0.0.0.0 is reached through loopback.
"""

from __future__ import annotations

import http.client
import secrets
from pathlib import Path

import pytest

from reactor.devstack import LOOPBACK, REACTOR_CLI, REPO_ROOT, WEBHOOK_PATH, free_port, spawn
from tests.support.e2e import post, sql, webhook_body, write_rules
from tests.support.stack import BucketNames, MinioStack, ReactorProcess, ReactorSpawner, reactor_env

ETAG = "0123456789abcdef0123456789abcdef"
SEQUENCER = "1870A1B2C3D4E5F6"


def rules_file(tmp_path: Path, src: str, dst: str) -> Path:
    return write_rules(
        tmp_path / "rules.toml",
        {
            "name": "alerts",
            "source_bucket": src,
            "pattern": "{task_type}/{task_id}/{filename}",
            "target_bucket": dst,
            "target": "{task_type}/{task_id}/{filename}",
        },
    )


def start(
    spawner: ReactorSpawner, env: dict[str, str], *, port: int, name: str, log_dir: Path
) -> ReactorProcess:
    """Start `reactor run` with exactly env (spawn_reactor always sets a token); stopped at teardown."""
    log_path = log_dir / f"{name}.log"
    popen = spawn([*REACTOR_CLI, "run"], log_path=log_path, env=env, cwd=REPO_ROOT)
    process = ReactorProcess(popen=popen, port=port, instance_id=name, log_path=log_path, env=env)
    spawner.processes.append(process)  # the fixture stops it, and shows its log if the test fails
    process.wait_healthy()
    return process


def listening_on_any_address(port: int) -> bool:
    """Whether a TCP socket listens on 0.0.0.0:port, read from /proc (nothing is connected to)."""
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, state = fields[1], fields[3]
        if local == f"00000000:{port:04X}" and state == "0A":  # 0A: LISTEN
            return True
    return False


def get(process: ReactorProcess, path: str) -> tuple[int, str]:
    conn = http.client.HTTPConnection(LOOPBACK, process.port, timeout=10)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return int(response.status), response.read().decode("utf-8", "replace")
    finally:
        conn.close()


def moves(database_url: str) -> int:
    return int(sql(database_url, "SELECT count(*) AS n FROM reactor.moves")[0]["n"])


@pytest.mark.parametrize("token", [None, "a-token-for-the-wide-bind"], ids=["allowed-without-token", "token"])
def test_a_non_loopback_bind_starts_with_a_token_or_when_allowed_explicitly(
    tmp_path: Path,
    minio: MinioStack,
    database_url: str,
    buckets: BucketNames,
    spawn_reactor: ReactorSpawner,
    token: str | None,
) -> None:
    src, dst = buckets("img"), buckets("alr")
    port = free_port()
    env = reactor_env(
        minio, database_url=database_url, rules_path=rules_file(tmp_path, src, dst), instance_id="wide"
    )
    env["REACTOR_HTTP_ADDR"] = f"0.0.0.0:{port}"  # the point of the test; reached via loopback only
    del env["REACTOR_WEBHOOK_TOKEN"]
    if token is None:
        env["REACTOR_ALLOW_UNAUTHENTICATED"] = "true"
    else:
        env["REACTOR_WEBHOOK_TOKEN"] = token
    process = start(spawn_reactor, env, port=port, name="wide", log_dir=tmp_path)
    assert listening_on_any_address(port)
    body = webhook_body(bucket=src, key="det/t1/a.jpg", etag=ETAG, size=1, sequencer=SEQUENCER)
    url = process.url + WEBHOOK_PATH
    if token is None:
        # Explicitly unauthenticated: anyone who reaches the port may post
        assert post(url, body, token=None)[0] == 200
    else:
        assert post(url, body, token=None)[0] == 401
        assert post(url, body, token="wrong")[0] == 401
        assert post(url, body, token=token)[0] == 200
    assert moves(database_url) == 1


def test_secrets_never_appear_in_logs_or_in_health_readiness_and_metrics(
    tmp_path: Path, minio: MinioStack, database_url: str, buckets: BucketNames, spawn_reactor: ReactorSpawner
) -> None:
    token = "tok-" + secrets.token_urlsafe(24)
    password = "pw-" + secrets.token_urlsafe(16)  # trust auth ignores it, but the URL carries it everywhere
    with_password = database_url.replace("postgres@", f"postgres:{password}@", 1)
    assert password in with_password
    src, dst = buckets.make("img"), buckets.make("alr")
    process = spawn_reactor(
        database_url=with_password,
        rules_path=rules_file(tmp_path, src, dst),
        env={"REACTOR_WEBHOOK_TOKEN": token, "REACTOR_LOG_LEVEL": "DEBUG"},
    )
    url = process.url + WEBHOOK_PATH
    body = webhook_body(bucket=src, key="det/t1/a.jpg", etag=ETAG, size=1, sequencer=SEQUENCER)
    # Wrong tokens, including near misses and the right token in the wrong place
    for wrong in (None, "", token[:-1], token + "x", token.upper(), f"Bearer {token}", f"Basic {token}"):
        status, answer = post(url, body, token=wrong)
        assert status == 401
        assert token not in str(answer)
    conn = http.client.HTTPConnection(LOOPBACK, process.port, timeout=10)
    try:
        conn.request("POST", WEBHOOK_PATH, body=body, headers={"Authorization": token})  # no "Bearer "
        assert conn.getresponse().status == 401
    finally:
        conn.close()
    # The right token, with a good event and a bad one
    assert post(url, body, token=token) == (200, {"enqueued": 1, "duplicate": 0, "ignored": 0, "failed": 0})
    status, answer = post(url, b'{"Records": [{"eventName": 1}]}', token=token)
    assert status == 400
    secret_values = {"token": token, "database password": password, "minio secret key": minio.secret_key}
    for path in ("/healthz", "/readyz", "/metrics"):
        status, text = get(process, path)
        assert status in (200, 404) if path == "/metrics" else status == 200
        for what, value in secret_values.items():
            assert value not in text, f"{path} shows the {what}"
    process.stop()  # the shutdown is logged too
    log = process.log_text()
    assert "reactor_stopping" in log
    assert "webhook_rejected" in log  # the log was written, at debug level
    for what, value in secret_values.items():
        assert value not in log, f"the log shows the {what}"


def test_an_unreachable_database_is_reported_without_its_password(
    tmp_path: Path, minio: MinioStack, buckets: BucketNames, spawn_reactor: ReactorSpawner
) -> None:
    password = "pw-" + secrets.token_urlsafe(16)
    nowhere = f"postgresql://reactor:{password}@{LOOPBACK}:{free_port()}/reactor"  # nothing listens there
    process = spawn_reactor(
        database_url=nowhere,
        rules_path=rules_file(tmp_path, buckets("img"), buckets("alr")),
        env={"REACTOR_LOG_LEVEL": "DEBUG", "REACTOR_POLL_INTERVAL": "0.2"},
    )
    status, text = get(process, "/readyz")
    assert status == 503
    assert password not in text
    body = webhook_body(bucket="img", key="det/t1/a.jpg", etag=ETAG, size=1, sequencer=SEQUENCER)
    status, answer = post(process.url + WEBHOOK_PATH, body, token=minio.webhook_token)
    assert status in (200, 503)  # 200: no rule on that bucket; never a detail that names the password
    assert password not in str(answer)
    process.stop()
    log = process.log_text()
    assert "127.0.0.1" in log  # the failure was logged ...
    assert password not in log  # ... without the password
