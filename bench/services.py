"""The bench's own PostgreSQL and MinIO (started like the tests start theirs), databases, and what the
results file says about the machine and the versions."""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import platform
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

import psycopg

from reactor.devstack import (
    LOOPBACK,
    REPO_ROOT,
    TEST_PG_SETTINGS,
    WEBHOOK_PATH,
    MinioServer,
    PostgresServer,
    StackError,
    free_port,
    minio_binary,
    webhook_arn,
    webhook_env,
)

WEBHOOK_TOKEN = "bench-token"  # noqa: S105 - a throwaway MinIO on loopback
TARGET_ID = "PRIMARY"


@dataclass
class BenchMinio:
    """One MinIO with one webhook target posting to a reactor on `webhook_port` (with or without a
    queue dir; with one, MINIO_API_SYNC_EVENTS=on as in the tests and `make run`)."""

    server: MinioServer
    webhook_port: int
    queued: bool

    @property
    def arn(self) -> str:
        return webhook_arn(TARGET_ID)


STATEMENTS_SETTINGS = {
    "shared_preload_libraries": "pg_stat_statements",
    "pg_stat_statements.track": "top",  # what clients send: one entry per round trip
    "pg_stat_statements.max": "10000",
}


def start_postgres(root: Path) -> tuple[PostgresServer, bool]:
    """The tests' speed settings, plus pg_stat_statements when the server has it. Returns
    (server, whether pg_stat_statements is on)."""
    log_path = root / "logs" / "postgres.log"
    pg = PostgresServer(
        root / "postgres", settings={**TEST_PG_SETTINGS, **STATEMENTS_SETTINGS}, log_path=log_path
    )
    try:
        pg.start()
        with pg.connect() as conn:
            conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
    except (StackError, psycopg.Error):
        pg.stop()
        pg = PostgresServer(root / "postgres", settings=TEST_PG_SETTINGS, log_path=log_path)
        pg.start()
        return pg, False
    return pg, True


def start_minio(root: Path, name: str, *, queued: bool) -> BenchMinio:
    port = free_port()
    url = f"http://{LOOPBACK}:{port}{WEBHOOK_PATH}"
    base = root / name
    env = webhook_env(TARGET_ID, url, WEBHOOK_TOKEN, base / "queue" if queued else None)
    server = MinioServer(minio_binary(), base / "data", env=env, log_path=root / "logs" / f"{name}.log")
    server.start()
    return BenchMinio(server=server, webhook_port=port, queued=queued)


def fresh_database(pg: PostgresServer, name: str, *, migrate: bool = True) -> str:
    """Drop and create `name`; migrate it with reactor.migrate.upgrade. Returns the SQLAlchemy URL."""
    pg.drop_database(name)
    pg.create_database(name)
    if migrate:
        from reactor.migrate import upgrade

        upgrade(pg.url(name))
        pg.terminate_connections(name)
    return pg.url(name)


def statement_calls(pg: PostgresServer, dbname: str) -> dict[str, int]:
    """Calls per statement text (top level, so one per client round trip) in one database."""
    with pg.connect() as conn:
        rows = conn.execute(
            "SELECT s.query, sum(s.calls)::bigint FROM pg_stat_statements s "
            "JOIN pg_database d ON d.oid = s.dbid WHERE d.datname = %s GROUP BY s.query",
            (dbname,),
        ).fetchall()
    return {str(q): int(str(n)) for q, n in rows}


def calls_delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    """Per statement, calls made in between; the bench's own statements (marked /* bench */) left out."""
    delta = {q: n - before.get(q, 0) for q, n in after.items() if "/* bench */" not in q}
    return {q: n for q, n in delta.items() if n > 0}


def xacts(pg: PostgresServer, dbname: str) -> int:
    """xact_commit + xact_rollback of one database (what all its sessions committed or rolled back)."""
    with pg.connect() as conn:
        row = conn.execute(
            "SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = %s", (dbname,)
        ).fetchone()
    return int(str(row[0])) if row and row[0] is not None else 0


# --------------------------------------------------------------------------------------------------
# Machine and versions


def machine() -> dict[str, str]:
    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
                break
    return {
        "nproc": str(os.cpu_count()),
        "memory": mem,
        "cpu": model,
        "kernel": platform.release(),
        "load average (at start)": " ".join(f"{x:.2f}" for x in os.getloadavg()),
    }


def versions(pg: PostgresServer) -> dict[str, str]:
    result = {"python": platform.python_version(), "minio-py": importlib.metadata.version("minio")}
    makefile = (REPO_ROOT / "Makefile").read_text()
    pin = re.search(r"^MINIO_VERSION\s*:=\s*(\S+)", makefile, re.MULTILINE)
    result["MinIO (Makefile pin)"] = pin.group(1) if pin else "unknown"
    with contextlib.suppress(Exception):
        out = subprocess.run(  # noqa: S603 - our own binary, fixed arguments
            [str(minio_binary()), "--version"], capture_output=True, text=True, timeout=10, check=False
        ).stdout.splitlines()
        if out:
            result["MinIO (binary)"] = out[0].strip()
    with pg.connect() as conn:
        row = conn.execute("SHOW server_version").fetchone()
    result["PostgreSQL server"] = str(row[0]) if row else "unknown"
    result["psycopg"] = importlib.metadata.version("psycopg")
    try:
        result["procrastinate"] = importlib.metadata.version("procrastinate")
    except importlib.metadata.PackageNotFoundError:
        result["procrastinate"] = "not installed"
    return result
