"""The test stack: one PostgreSQL and one MinIO per session, a database and buckets per test, and
reactor processes that are always stopped at teardown.

Conftest files import the fixtures and hooks from here (integration and chaos share them). Services are
singletons of the session, so both suites use the same servers even though each conftest defines its own
copy of the fixtures; stopping them is idempotent and backed by atexit.
"""

from __future__ import annotations

import atexit
import itertools
import os
import re
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Generator, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from minio.commonconfig import ENABLED
from minio.versioningconfig import VersioningConfig

from reactor.devstack import (
    LOOPBACK,
    REACTOR_CLI,
    REPO_ROOT,
    TEST_PG_SETTINGS,
    WEBHOOK_PATH,
    MinioServer,
    PostgresServer,
    StackError,
    free_port,
    minio_binary,
    spawn,
    terminate,
    webhook_arn,
    webhook_env,
)

WEBHOOK_TOKEN = "test-token"
WEBHOOK_TARGET = "PRIMARY"
TEMPLATE_DATABASE = "reactor_template"
REACTOR_START_TIMEOUT = 30.0
KEEP_ENV = "REACTOR_TEST_KEEP"  # =1 keeps the session's state dir (data, logs) even when all passed


class MinioStack(MinioServer):
    """The session's MinIO: a webhook target that posts to a reactor on `webhook_port`, queued on disk."""

    def __init__(
        self,
        binary: Path,
        root: Path,
        *,
        webhook_port: int | None = None,
        webhook_token: str = WEBHOOK_TOKEN,
        target_id: str = WEBHOOK_TARGET,
        extra_env: Mapping[str, str] | None = None,
    ) -> None:
        self.root = root
        self.webhook_port = webhook_port if webhook_port is not None else free_port()
        self.webhook_token = webhook_token
        self.target_id = target_id
        self.arn = webhook_arn(target_id)
        self.webhook_url = f"http://{LOOPBACK}:{self.webhook_port}{WEBHOOK_PATH}"
        self.queue_dir = root / "queue"
        env = webhook_env(target_id, self.webhook_url, webhook_token, self.queue_dir)
        env.update(extra_env or {})
        super().__init__(binary, root / "data", env=env, log_path=root / "minio.log")

    def ensure_running(self) -> None:
        """Start again if a test stopped or killed the session server and did not bring it back."""
        if not self.running:
            self.start()


# --------------------------------------------------------------------------------------------------
# Reactor processes


@dataclass(eq=False)
class ReactorProcess:
    """One `python -m reactor.cli run` child; its stdout and stderr go to log_path."""

    popen: subprocess.Popen[bytes]
    port: int
    instance_id: str
    log_path: Path
    env: dict[str, str] = field(repr=False)

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def alive(self) -> bool:
        return self.popen.poll() is None

    @property
    def returncode(self) -> int | None:
        return self.popen.poll()

    def kill(self) -> None:
        """SIGKILL, no chance to clean up: a crash."""
        terminate(self.popen, signal.SIGKILL, 10.0)

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM, wait up to timeout seconds, then SIGKILL. Returns the exit code."""
        return terminate(self.popen, signal.SIGTERM, timeout)

    def log_text(self) -> str:
        return self.log_path.read_text("utf-8", "replace") if self.log_path.exists() else ""

    def log_tail(self, lines: int = 80) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def wait_healthy(self, timeout: float = REACTOR_START_TIMEOUT) -> None:
        """Return once GET /healthz answers 200; raise with the log's tail if it exits or times out."""
        deadline = time.monotonic() + timeout
        while True:
            if not self.alive:
                raise StackError(
                    f"reactor {self.instance_id} exited with code {self.returncode} before /healthz "
                    f"answered; {self.log_path}:\n{self.log_tail()}"
                )
            if _http_status(f"{self.url}/healthz") == 200:
                return
            if time.monotonic() > deadline:
                self.kill()
                raise StackError(
                    f"reactor {self.instance_id} did not answer /healthz with 200 within {timeout:.0f}s; "
                    f"{self.log_path}:\n{self.log_tail()}"
                )
            time.sleep(0.1)


def _http_status(url: str) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=1.0) as response:  # noqa: S310 - loopback http only
            return int(response.status)
    except urllib.error.HTTPError as exc:
        exc.close()
        return int(exc.code)
    except (OSError, ValueError):
        return None


def base_env() -> dict[str, str]:
    """This process's environment without REACTOR_* (a shell that ran `devstack env` must not leak in),
    plus what makes `python -m reactor.cli` import this checkout."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("REACTOR_")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def reactor_env(
    minio: MinioStack,
    *,
    database_url: str,
    rules_path: Path | None = None,
    http_port: int | None = None,
    instance_id: str | None = None,
    env: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The environment a reactor (or a CLI call) needs to use the test stack; `env` wins."""
    result = base_env()
    result.update(
        REACTOR_DATABASE_URL=database_url,
        REACTOR_MINIO_ENDPOINT=minio.endpoint,
        REACTOR_MINIO_ACCESS_KEY=minio.access_key,
        REACTOR_MINIO_SECRET_KEY=minio.secret_key,
        REACTOR_WEBHOOK_TOKEN=minio.webhook_token,
        REACTOR_NOTIFY_ARN=minio.arn,
        REACTOR_LOG_LEVEL="DEBUG",
    )
    if rules_path is not None:
        result["REACTOR_RULES"] = str(rules_path)
    if http_port is not None:
        result["REACTOR_HTTP_ADDR"] = f"{LOOPBACK}:{http_port}"
    if instance_id is not None:
        result["REACTOR_INSTANCE_ID"] = instance_id
    result.update(env or {})
    return result


def run_cli(
    args: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    timeout: float = 120.0,
    check: bool = False,
    input: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run `python -m reactor.cli ARGS` to completion, output captured as text."""
    result = subprocess.run(
        [*REACTOR_CLI, *args],
        env=dict(env) if env is not None else base_env(),
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        input=input,
        check=False,
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"reactor {' '.join(args)} exited with {result.returncode}\n"
            f"--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}"
        )
    return result


class ReactorSpawner:
    """The `spawn_reactor` fixture: starts reactors for one test and stops all of them at its teardown."""

    def __init__(self, minio: MinioStack, log_dir: Path) -> None:
        self.minio = minio
        self.log_dir = log_dir
        self.processes: list[ReactorProcess] = []
        self._numbers = itertools.count(1)

    def __call__(
        self,
        *,
        database_url: str,
        rules_path: Path,
        http_port: int | None = None,
        env: Mapping[str, str] | None = None,
        instance_id: str | None = None,
    ) -> ReactorProcess:
        number = next(self._numbers)
        instance_id = instance_id or f"reactor-{number}"
        port = http_port if http_port is not None else free_port()
        full_env = reactor_env(
            self.minio,
            database_url=database_url,
            rules_path=rules_path,
            http_port=port,
            instance_id=instance_id,
            env=env,
        )
        self.minio.ensure_running()
        log_path = self.log_dir / f"{number:02d}-{_slug(instance_id)}.log"
        popen = spawn([*REACTOR_CLI, "run"], log_path=log_path, env=full_env, cwd=REPO_ROOT)
        process = ReactorProcess(
            popen=popen, port=port, instance_id=instance_id, log_path=log_path, env=full_env
        )
        self.processes.append(process)
        process.wait_healthy()
        return process

    def stop_all(self) -> None:
        for process in self.processes:
            process.stop()


# --------------------------------------------------------------------------------------------------
# The session


class BucketNames:
    """The `buckets` fixture: `buckets("images")` gives a bucket name no other test of the session uses;
    `buckets.make("images")` also creates it on the session MinIO."""

    def __init__(self, session: SessionStack) -> None:
        self._session = session
        self.names: list[str] = []

    def __call__(self, prefix: str = "b") -> str:
        name = self._session.unique_bucket_name(prefix)
        self.names.append(name)
        return name

    def make(self, prefix: str = "b", *, versioned: bool = False) -> str:
        name = self(prefix)
        minio = self._session.minio()
        client = minio.client()
        client.make_bucket(name)
        if versioned:
            client.set_bucket_versioning(name, VersioningConfig(ENABLED))
        return name


class SessionStack:
    """Everything the session starts, created lazily, stopped once."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="reactor-test-"))
        self.root.chmod(0o755)  # PostgreSQL runs as another OS user when we are root: it must get in
        self.tag = secrets.token_hex(3)
        self.timings: dict[str, float] = {}
        self.keep = os.environ.get(KEEP_ENV) == "1"
        self._pg: PostgresServer | None = None
        self._minio: MinioStack | None = None
        self._template: str | None = None
        self._databases = itertools.count(1)
        self._buckets = itertools.count(1)
        self._tests = itertools.count(1)

    def postgres(self) -> PostgresServer:
        if self._pg is None:
            self._pg = PostgresServer(
                self.root / "postgres",
                settings=TEST_PG_SETTINGS,
                log_path=self.root / "logs" / "postgres.log",
            )
        if not self._pg.running:
            started = time.monotonic()
            self._pg.start()
            self.timings.setdefault("postgres start (initdb included)", time.monotonic() - started)
        return self._pg

    def minio(self) -> MinioStack:
        if self._minio is None:
            self._minio = MinioStack(minio_binary(), self.root / "minio")
        if not self._minio.running:
            started = time.monotonic()
            self._minio.start()
            self.timings.setdefault("minio start", time.monotonic() - started)
        return self._minio

    def template_database(self) -> str:
        """reactor_template, migrated once per session by reactor.migrate.upgrade."""
        pg = self.postgres()
        if self._template is None:
            from reactor.migrate import upgrade  # lazily: only tests that need the schema pay for it

            started = time.monotonic()
            pg.drop_database(TEMPLATE_DATABASE)
            pg.create_database(TEMPLATE_DATABASE)
            upgrade(pg.url(TEMPLATE_DATABASE))
            pg.terminate_connections(TEMPLATE_DATABASE)  # CREATE ... TEMPLATE needs it idle
            self._template = TEMPLATE_DATABASE
            self.timings["template migration"] = time.monotonic() - started
        return self._template

    def next_database_name(self) -> str:
        return f"t_{next(self._databases)}"

    def unique_bucket_name(self, prefix: str = "b") -> str:
        # S3 rules: 3-63 chars of [a-z0-9.-], starting and ending with a letter or digit.
        clean = re.sub(r"[^a-z0-9-]+", "-", prefix.lower()).strip("-")[:40] or "b"
        return f"{clean}-{self.tag}-{next(self._buckets)}"

    def test_log_dir(self, nodeid: str) -> Path:
        path = self.root / "logs" / "tests" / f"{next(self._tests):04d}-{_slug(nodeid)[:80]}"
        path.mkdir(parents=True, exist_ok=True)
        return path

    def stop_postgres(self) -> None:
        if self._pg is not None:
            self._pg.stop()

    def stop_minio(self) -> None:
        if self._minio is not None:
            self._minio.stop()

    def close(self, *, remove: bool) -> None:
        self.stop_minio()
        self.stop_postgres()
        if remove and not self.keep:
            shutil.rmtree(self.root, ignore_errors=True)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "x"


class _Holder:
    stack: SessionStack | None = None


def session_stack() -> SessionStack:
    """The session's stack, created on first use."""
    if _Holder.stack is None:
        _Holder.stack = SessionStack()
    return _Holder.stack


# --------------------------------------------------------------------------------------------------
# Fixtures (import these names into a conftest)

_REACTORS = pytest.StashKey[list[ReactorProcess]]()


@pytest.fixture(scope="session")
def pg() -> Iterator[PostgresServer]:
    """The session's PostgreSQL (test-speed settings); stopped at session end."""
    stack = session_stack()
    yield stack.postgres()
    stack.stop_postgres()


@pytest.fixture(scope="session")
def template_database(pg: PostgresServer) -> str:
    """`reactor_template`, migrated once with reactor.migrate.upgrade; each test copies it."""
    del pg  # ordering only: the server must be up
    return session_stack().template_database()


@pytest.fixture
def database_url(pg: PostgresServer, template_database: str) -> Iterator[str]:
    """A fresh database t_<n> copied from the template; its SQLAlchemy URL. Force-dropped afterwards."""
    if not pg.running:  # a test before this one stopped the server and left it down
        pg.start()
    name = session_stack().next_database_name()
    pg.create_database(name, template=template_database)
    yield pg.url(name)
    if not pg.running:
        pg.start()
    pg.drop_database(name)


@pytest.fixture(scope="session")
def minio() -> Iterator[MinioStack]:
    """The session's MinIO, webhook target PRIMARY -> http://127.0.0.1:<webhook_port>/minio/events."""
    stack = session_stack()
    yield stack.minio()
    stack.stop_minio()


@pytest.fixture
def buckets() -> BucketNames:
    """Bucket names unique in the session: `buckets("images")`, or `buckets.make("images")`."""
    return BucketNames(session_stack())


@pytest.fixture
def spawn_reactor(request: pytest.FixtureRequest, minio: MinioStack) -> Iterator[ReactorSpawner]:
    """Start reactors for this test; all are stopped at teardown, their logs shown if the test fails."""
    spawner = ReactorSpawner(minio, session_stack().test_log_dir(request.node.nodeid))
    request.node.stash[_REACTORS] = spawner.processes
    try:
        yield spawner
    finally:
        spawner.stop_all()


@pytest.fixture
def reactor_env_for(minio: MinioStack) -> ReactorEnvFactory:
    """`reactor_env_for(database_url=..., rules_path=...)`: env for run_cli against the test stack."""
    return ReactorEnvFactory(minio)


@dataclass(frozen=True)
class ReactorEnvFactory:
    minio: MinioStack

    def __call__(
        self,
        *,
        database_url: str,
        rules_path: Path | None = None,
        http_port: int | None = None,
        instance_id: str | None = None,
        env: Mapping[str, str] | None = None,
    ) -> dict[str, str]:
        return reactor_env(
            self.minio,
            database_url=database_url,
            rules_path=rules_path,
            http_port=http_port,
            instance_id=instance_id,
            env=env,
        )


# --------------------------------------------------------------------------------------------------
# Hooks (import these names into a conftest too)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """A failing test's report carries the tail of each of its reactors' logs."""
    del call
    report = yield
    if report.failed:
        for process in item.stash.get(_REACTORS, []):
            report.sections.append(
                (
                    f"reactor {process.instance_id} (pid {process.pid}) log {process.log_path}",
                    process.log_tail(200),
                )
            )
    return report


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    stack = _Holder.stack
    if stack is None or getattr(terminalreporter, "_reactor_stack_reported", False):
        return
    terminalreporter._reactor_stack_reported = True  # type: ignore[attr-defined]  # both conftests call us
    failed = bool(terminalreporter.stats.get("failed") or terminalreporter.stats.get("error"))
    terminalreporter.write_sep("-", "reactor test stack")
    for what, seconds in stack.timings.items():
        terminalreporter.write_line(f"{what}: {seconds:.2f}s")
    if failed or stack.keep:
        terminalreporter.write_line(f"state and logs kept in {stack.root}")
    else:
        terminalreporter.write_line(f"state in {stack.root} removed ({KEEP_ENV}=1 keeps it)")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    stack = _Holder.stack
    if stack is not None:
        stack.close(remove=exitstatus == 0 and not session.testsfailed)


@atexit.register
def _close_at_exit() -> None:
    # Backstop for an interrupted session; devstack's own atexit handler also kills leftover children.
    stack = _Holder.stack
    if stack is not None:
        stack.close(remove=False)


__all__ = [
    "WEBHOOK_TOKEN",
    "BucketNames",
    "MinioStack",
    "ReactorEnvFactory",
    "ReactorProcess",
    "ReactorSpawner",
    "SessionStack",
    "base_env",
    "buckets",
    "database_url",
    "minio",
    "pg",
    "pytest_runtest_makereport",
    "pytest_sessionfinish",
    "pytest_terminal_summary",
    "reactor_env",
    "reactor_env_for",
    "run_cli",
    "session_stack",
    "spawn_reactor",
    "template_database",
]
