"""The procrastinate row: one job per move with lock=<task>, run by a procrastinate worker process with
the reactor's own move function (reactor.mover.Mover over reactor.objectstore.MinioStore).

The uploader threads defer each job right after their PUT returns (the event path of this row), through
procrastinate's sync connector. The worker is a separate process, so its CPU and RSS are measured like
a reactor's. The worker side runs as `python -m bench.procr_worker ...`.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psycopg
from minio import Minio

from bench.common import RowResult, Uploaded, Workload, check_moved, cpu_seconds, peak_rss_kib, upload_all
from bench.services import BenchMinio, calls_delta, fresh_database, statement_calls, xacts
from reactor.devstack import REPO_ROOT, PostgresServer, spawn, terminate

TASK_NAME = "bench_move"
NOT_INSTALLED = "procrastinate: not installed (pip install -e '.[bench]')"


def available() -> bool:
    return importlib.util.find_spec("procrastinate") is not None


def worker_main(  # noqa: PLR0917 - the worker's command line, in order
    dsn: str, endpoint: str, access: str, secret: str, concurrency: int, poll: float
) -> None:
    import procrastinate

    from reactor.domain import MoveStatus
    from reactor.mover import MoveOrder, Mover
    from reactor.objectstore import MinioStore

    mover = Mover(
        MinioStore(endpoint=endpoint, access_key=access, secret_key=secret, pool_size=concurrency + 2)
    )
    app = procrastinate.App(
        connector=procrastinate.PsycopgConnector(conninfo=dsn, kwargs={"application_name": "bench-procr"})
    )

    @app.task(name=TASK_NAME)
    def move(*, key: str, etag: str, size: int, source: str, target: str) -> None:
        result = mover.execute(
            MoveOrder(
                source_bucket=source,
                source_key=key,
                version_id="",
                etag=etag,
                size=size,
                target_bucket=target,
                target_key=key,
            )
        )
        if result.status is not MoveStatus.DONE:
            raise RuntimeError(f"move of {key}: {result.status.value} {result.error or result.note or ''}")

    async def main() -> None:
        # Sync tasks run in the loop's default executor: size it to the concurrency, as the reactor's.
        asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(max_workers=concurrency))
        async with app.open_async():
            await app.run_worker_async(
                concurrency=concurrency, wait=True, listen_notify=True, fetch_job_polling_interval=poll
            )

    asyncio.run(main())


def run_procrastinate_row(  # noqa: PLR0915 - one straight sequence of steps
    workload: Workload,
    *,
    pg: PostgresServer,
    minio: BenchMinio,
    client: Minio,
    root: Path,
    names: tuple[str, str, str],
    concurrency: int,
    deadline: float,
    statements: bool,
    poll_interval: float,
) -> RowResult:
    import procrastinate

    dbname, source, target = names
    fresh_database(pg, dbname, migrate=False)
    dsn = pg.dsn(dbname)
    result = RowResult(row="procrastinate", workload=workload.name, count=workload.count)
    app = procrastinate.App(connector=procrastinate.SyncPsycopgConnector(conninfo=dsn))
    app.open()
    try:
        app.schema_manager.apply_schema()
        before = xacts(pg, dbname)
        calls_before = statement_calls(pg, dbname) if statements else {}
        polls = 0
        log_path = root / "logs" / f"{dbname}.log"
        popen = spawn(
            [
                sys.executable,
                "-m",
                "bench.procr_worker",
                dsn,
                minio.server.endpoint,
                minio.server.access_key,
                minio.server.secret_key,
                str(concurrency),
                str(poll_interval),
            ],
            log_path=log_path,
            env={
                **{k: v for k, v in os.environ.items() if not k.startswith("REACTOR_")},
                "PYTHONPATH": str(REPO_ROOT),
                "PYTHONUNBUFFERED": "1",
            },
            cwd=REPO_ROOT,
        )
        uploads: list[Uploaded] = []
        try:
            with psycopg.connect(dsn, autocommit=True) as conn:
                start_by = time.monotonic() + 60
                while not conn.execute("SELECT /* bench */ 1 FROM procrastinate_workers LIMIT 1").fetchone():
                    polls += 1
                    if popen.poll() is not None or time.monotonic() > start_by:
                        raise RuntimeError(f"procrastinate worker did not start; see {log_path}")
                    time.sleep(0.1)
                polls += 1
                cpu_before = cpu_seconds(popen.pid) or 0.0

                def defer(item: Uploaded) -> None:
                    app.configure_task(TASK_NAME, lock=item.task).defer(
                        key=item.key, etag=item.etag, size=item.size, source=source, target=target
                    )

                uploads = upload_all(client, source, workload, deadline=deadline, on_uploaded=defer)
                finished = 0
                while time.monotonic() < deadline:
                    row = conn.execute(
                        "SELECT /* bench */ count(*) FROM procrastinate_jobs "
                        "WHERE status IN ('succeeded', 'failed')"
                    ).fetchone()
                    polls += 1
                    finished = int(row[0]) if row else 0
                    if finished >= len(uploads):
                        break
                    time.sleep(0.25)
                else:
                    result.notes.append(f"timed out: {finished}/{len(uploads)} finished")
                result.cpu_seconds = (cpu_seconds(popen.pid) or 0.0) - cpu_before
                result.peak_rss_kib = peak_rss_kib(popen.pid)
        finally:
            terminate(popen, signal.SIGTERM, 20.0)
        time.sleep(0.5)
        # The deferrals are the event path here and are counted too (one transaction each).
        result.db_xacts = max(0, xacts(pg, dbname) - before - polls)
        if statements:
            result.statements = calls_delta(calls_before, statement_calls(pg, dbname))
        with psycopg.connect(dsn, autocommit=True) as conn:
            rows: list[Any] = conn.execute(
                "SELECT j.args->>'key', j.status::text, extract(epoch FROM e.at)::float8 "
                "FROM procrastinate_jobs j LEFT JOIN procrastinate_events e "
                "ON e.job_id = j.id AND e.type = 'succeeded'"
            ).fetchall()
    finally:
        app.close()
    done_at = {str(r[0]): float(r[2]) for r in rows if r[2] is not None}
    failed = sum(1 for r in rows if r[1] != "succeeded")
    if failed:
        result.notes.append(f"{failed} job(s) not succeeded")
    if uploads and done_at:
        first = min(u.started for u in uploads)
        result.moves_per_s = len(done_at) / max(1e-9, max(done_at.values()) - first)
        result.latencies = [done_at[u.key] - u.done for u in uploads if u.key in done_at]
    result.moved, note = check_moved(client, source, target, uploads)
    if note:
        result.notes.append(note)
    return result
