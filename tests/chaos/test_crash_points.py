"""Crash points of the mover: a worker dies after the copy, after the verify, or after the delete
(before the outcome is recorded), and a fresh worker must finish the move correctly.

The real components run in-process against the session's PostgreSQL and MinIO: Outbox, Mover over
MinioStore, Poller. The death is a BaseException raised from Poller.step_hook, which escapes the
poller's `except Exception` the way a process death escapes everything; one variant kills a real
process with os._exit(137) at the step instead.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
from minio import Minio
from psycopg.rows import dict_row
from sqlalchemy import Engine
from sqlalchemy.engine import make_url

from reactor.devstack import REPO_ROOT
from reactor.domain import OnConflict, Upload
from reactor.ingest import Ingestor
from reactor.mover import Mover
from reactor.objectstore import MinioStore
from reactor.outbox import ClaimedMove, Outbox, make_engine
from reactor.poller import Poller, PollerConfig
from reactor.rules import load_rules
from tests.support.stack import BucketNames, MinioStack, base_env

LEASE = 1.0
KEY = "det/t1/crash 猫+100%.jpg"
ENQUEUER = "test-enqueuer"

# The step named by Poller.step_hook that comes right after each crash point.
AFTER_COPY = "verify"  # the copy is done, the verify is not
AFTER_VERIFY = "delete"  # the target is verified, the source not yet deleted
AFTER_DELETE = "finish"  # the source is deleted, the outcome not yet recorded
POINTS = (AFTER_COPY, AFTER_VERIFY, AFTER_DELETE)


class SimulatedCrash(BaseException):
    """A process death at an exact step: not an Exception, so nothing in the poller handles it."""


# --------------------------------------------------------------------------------------------------
# Helpers


def conninfo(database_url: str) -> str:
    return make_url(database_url).set(drivername="postgresql").render_as_string(hide_password=False)


def rows(database_url: str, query: str, params: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    with psycopg.connect(conninfo(database_url), autocommit=True, row_factory=dict_row) as conn:
        return list(conn.execute(query, params or {}).fetchall())


def sha256_of(client: Minio, bucket: str, key: str, version_id: str | None = None) -> str | None:
    try:
        response = client.get_object(bucket, key, version_id=version_id)
    except Exception:
        return None
    try:
        return hashlib.sha256(response.read()).hexdigest()
    finally:
        response.close()
        response.release_conn()


def source_versions(client: Minio, bucket: str) -> list[str]:
    return [
        f"{o.object_name}@{o.version_id}{' (delete marker)' if o.is_delete_marker else ''}"
        for o in client.list_objects(bucket, recursive=True, include_version=True)
    ]


@dataclass(frozen=True, kw_only=True)
class Case:
    """A source kind: the multipart one exercises the checkpointed target ETag."""

    name: str
    versioned: bool
    size: int
    part_size: int = 0


CASES = (
    Case(name="unversioned", versioned=False, size=40_000),
    Case(name="versioned", versioned=True, size=40_000),
    Case(name="multipart", versioned=False, size=6 * 1024 * 1024 + 17, part_size=5 * 1024 * 1024),
)


@dataclass(frozen=True, kw_only=True)
class Stage:
    """One test's buckets, its enqueued upload, and what it must end as."""

    database_url: str
    minio: MinioStack
    client: Minio
    src: str
    dst: str
    upload: Upload
    sha256: str
    move_id: int

    def move(self) -> dict[str, Any]:
        (row,) = rows(
            self.database_url, "SELECT * FROM reactor.moves WHERE id = %(id)s", {"id": self.move_id}
        )
        return row

    def trail(self) -> list[tuple[str, str | None]]:
        return [
            (r["kind"], r["worker"])
            for r in rows(
                self.database_url,
                "SELECT kind, worker FROM reactor.move_events WHERE move_id = %(id)s ORDER BY at, id",
                {"id": self.move_id},
            )
        ]

    def sessions(self) -> list[dict[str, Any]]:
        """The database's other sessions and the locks they hold, to explain a move nobody recovers."""
        return rows(
            self.database_url,
            "SELECT a.pid, a.application_name, a.state, a.xact_start, left(a.query, 120) AS query, "
            "array_agg(l.mode || ' on ' || coalesce(l.relation::regclass::text, l.locktype)) AS locks "
            "FROM pg_stat_activity a LEFT JOIN pg_locks l ON l.pid = a.pid AND l.granted "
            "WHERE a.datname = current_database() AND a.pid <> pg_backend_pid() "
            "GROUP BY 1, 2, 3, 4, 5",
        )

    def source_sha256(self) -> str | None:
        return sha256_of(self.client, self.src, self.upload.key, self.upload.version_id or None)

    def target_sha256(self) -> str | None:
        return sha256_of(self.client, self.dst, self.upload.key)


def stage(tmp_path: Path, database_url: str, minio: MinioStack, buckets: BucketNames, case: Case) -> Stage:
    """Buckets, a rule, one upload, and its move enqueued through the Ingestor (as a webhook would)."""
    src, dst = buckets.make("crash-src", versioned=case.versioned), buckets.make("crash-dst")
    rules_path = tmp_path / "rules.toml"
    rule = {
        "name": "crash",
        "source_bucket": src,
        "pattern": "{task_type}/{task_id}/{filename}",
        "target_bucket": dst,
        "target": "{task_type}/{task_id}/{filename}",
        "order_key": "{task_id}",
    }
    rules_path.write_text(
        "[[rules]]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in rule.items()), encoding="utf-8"
    )
    client = minio.client()
    data = os.urandom(case.size)
    if case.part_size:
        result = client.put_object(src, KEY, io.BytesIO(data), -1, part_size=case.part_size)
    else:
        result = client.put_object(src, KEY, io.BytesIO(data), len(data))
    upload = Upload(
        bucket=src,
        key=KEY,
        etag=(result.etag or "").strip('"'),
        size=len(data),
        version_id=result.version_id or "",
        sequencer=f"{time.time_ns():016X}",
        event_name="s3:ObjectCreated:Put",
    )
    assert upload.is_multipart == bool(case.part_size)
    engine = make_engine(database_url, pool_size=1)
    try:
        report = Ingestor(rules=load_rules(rules_path), outbox=Outbox(engine), worker=ENQUEUER).ingest(
            [upload], via="webhook"
        )
    finally:
        engine.dispose()
    assert report.enqueued == 1
    (row,) = rows(database_url, "SELECT id FROM reactor.moves")
    return Stage(
        database_url=database_url,
        minio=minio,
        client=client,
        src=src,
        dst=dst,
        upload=upload,
        sha256=hashlib.sha256(data).hexdigest(),
        move_id=int(row["id"]),
    )


@dataclass
class Worker:
    """One worker as `reactor run` wires it: its own engine and store, and heartbeats every lease/3."""

    name: str
    engine: Engine
    poller: Poller
    beating: threading.Event
    heart: threading.Thread

    def stop_heartbeats(self) -> None:
        self.beating.clear()


def poller_for(database_url: str, minio: MinioStack, name: str) -> tuple[Engine, Poller]:
    engine = make_engine(database_url, pool_size=3)
    store = MinioStore(
        endpoint=minio.endpoint,
        access_key=minio.access_key,
        secret_key=minio.secret_key,
        pool_size=3,
        timeout=30.0,
    )
    poller = Poller(
        outbox=Outbox(engine),
        mover=Mover(store),
        config=PollerConfig(
            worker=name,
            concurrency=1,
            lease_seconds=LEASE,
            max_attempts=5,
            block_on_failure=False,
            retry_base_delay=0.1,
            retry_max_delay=1.0,
        ),
        on_conflict=lambda _rule: OnConflict.OVERWRITE,
    )
    return engine, poller


@contextmanager
def worker(database_url: str, minio: MinioStack, name: str) -> Iterator[Worker]:
    engine, poller = poller_for(database_url, minio, name)
    beating = threading.Event()
    beating.set()
    done = threading.Event()

    def beat() -> None:
        while not done.wait(LEASE / 3):
            if beating.is_set():
                poller.heartbeat()

    heart = threading.Thread(target=beat, name=f"heartbeat-{name}", daemon=True)
    heart.start()
    try:
        yield Worker(name=name, engine=engine, poller=poller, beating=beating, heart=heart)
    finally:
        done.set()
        heart.join(10)
        poller.stop(timeout=10)
        poller.executor.shutdown(wait=True)
        engine.dispose()


def crash_in_process(stage_: Stage, point: str) -> None:
    """Worker 1 claims the move and dies at `point`; afterwards nothing of it runs any more."""
    with worker(stage_.database_url, stage_.minio, "worker-1") as w1:
        crashed = threading.Event()
        died: list[threading.Thread] = []

        def hook(_move: ClaimedMove, step: str) -> None:
            if step != point:
                return
            # The process is gone: no more heartbeats, no more claims, no more steps.
            w1.stop_heartbeats()
            w1.poller.stop(timeout=0)
            died.append(threading.current_thread())
            crashed.set()
            raise SimulatedCrash(step)

        w1.poller.step_hook = hook
        w1.poller.wake()
        assert crashed.wait(30), f"worker 1 never reached {point}; move: {stage_.move()}"
        w1.poller.executor.shutdown(wait=True)
        (thread,) = died
        thread.join(10)
        assert not thread.is_alive()


def crash_in_subprocess(stage_: Stage, point: str) -> None:
    """A real process claims the move and exits with os._exit(137) at `point`."""
    args = {
        "database_url": stage_.database_url,
        "endpoint": stage_.minio.endpoint,
        "access_key": stage_.minio.access_key,
        "secret_key": stage_.minio.secret_key,
        "point": point,
        "lease": LEASE,
    }
    result = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(args)],
        env=base_env(),
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 137, (result.returncode, result.stdout[-3000:], result.stderr[-3000:])


# The child: the same components, wired as `reactor run` wires them, dying for real at the step.
CHILD = """
import json, os, sys, threading, time
from reactor.domain import OnConflict
from reactor.mover import Mover
from reactor.objectstore import MinioStore
from reactor.outbox import Outbox, make_engine
from reactor.poller import Poller, PollerConfig

a = json.loads(sys.argv[1])
store = MinioStore(
    endpoint=a["endpoint"], access_key=a["access_key"], secret_key=a["secret_key"], timeout=30.0
)
poller = Poller(
    outbox=Outbox(make_engine(a["database_url"], pool_size=3)),
    mover=Mover(store),
    config=PollerConfig(worker="process-1", concurrency=1, lease_seconds=a["lease"], max_attempts=5,
                        block_on_failure=False, retry_base_delay=0.1, retry_max_delay=1.0),
    on_conflict=lambda _rule: OnConflict.OVERWRITE,
)

def hook(_move, step):
    if step == a["point"]:
        os._exit(137)

def beat():
    while True:
        time.sleep(a["lease"] / 3)
        poller.heartbeat()

poller.step_hook = hook
threading.Thread(target=beat, daemon=True).start()
deadline = time.monotonic() + 60
while time.monotonic() < deadline:
    poller.wake()
    time.sleep(0.2)
print("the move never reached", a["point"], file=sys.stderr)
os._exit(3)
"""


def check_state_after_crash(stage_: Stage, point: str, worker_name: str) -> None:
    """What S3 and the outbox hold between the crash and the recovery."""
    move = stage_.move()
    assert (move["status"], move["worker"], move["attempts"]) == ("running", worker_name, 1)
    assert stage_.target_sha256() == stage_.sha256, "the copy ran before every crash point"
    if point == AFTER_DELETE:
        assert stage_.source_sha256() is None, "the source was deleted before the crash"
        if stage_.upload.version_id:
            assert source_versions(stage_.client, stage_.src) == []
    else:
        assert stage_.source_sha256() == stage_.sha256, "the source is still there before the delete"
    if stage_.upload.is_multipart and point in (AFTER_VERIFY, AFTER_DELETE):
        # The proven target ETag was checkpointed before the delete, so a re-run recognises the copy
        target = stage_.client.stat_object(stage_.dst, stage_.upload.key)
        assert move["target_etag"] == (target.etag or "").strip('"')


def finish_with_fresh_worker(stage_: Stage, crashed_worker: str) -> None:
    """Worker 2 recovers the expired lease and completes the move; check the end state and the trail."""
    with worker(stage_.database_url, stage_.minio, "worker-2") as w2:
        deadline = time.monotonic() + 60  # generous: a starved CI machine, not the lease, is the limit
        while stage_.move()["status"] != "done":
            assert time.monotonic() < deadline, (
                f"worker 2 did not finish: {stage_.move()} {stage_.trail()}; sessions: {stage_.sessions()}"
            )
            w2.poller.recover()
            w2.poller.wake()
            time.sleep(0.1)
    move = stage_.move()
    assert (move["status"], move["worker"], move["attempts"]) == ("done", "worker-2", 2)
    assert stage_.target_sha256() == stage_.sha256
    assert stage_.source_sha256() is None
    if stage_.upload.version_id:
        assert source_versions(stage_.client, stage_.src) == []
    assert rows(stage_.database_url, "SELECT count(*) AS n FROM reactor.moves")[0]["n"] == 1
    assert stage_.trail() == [
        ("enqueued", ENQUEUER),
        ("claimed", crashed_worker),
        ("lease_expired", "worker-2"),
        ("claimed", "worker-2"),
        ("done", "worker-2"),
    ]


# --------------------------------------------------------------------------------------------------
# Tests


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
@pytest.mark.parametrize("point", POINTS, ids=["after-copy", "after-verify", "after-delete"])
def test_a_worker_dying_at_a_crash_point_leaves_a_move_a_fresh_worker_finishes(
    tmp_path: Path, database_url: str, minio: MinioStack, buckets: BucketNames, point: str, case: Case
) -> None:
    # Given one upload's move, claimed by worker 1
    stage_ = stage(tmp_path, database_url, minio, buckets, case)
    # When worker 1 dies at the crash point (its thread gone, no heartbeats, nothing recorded)
    crash_in_process(stage_, point)
    check_state_after_crash(stage_, point, "worker-1")
    # Then a fresh worker takes the expired lease over and finishes the move exactly once
    finish_with_fresh_worker(stage_, "worker-1")


@pytest.mark.parametrize("point", POINTS, ids=["after-copy", "after-verify", "after-delete"])
def test_a_process_exiting_at_a_crash_point_leaves_a_move_a_fresh_worker_finishes(
    tmp_path: Path, database_url: str, minio: MinioStack, buckets: BucketNames, point: str
) -> None:
    # Given one upload's move
    stage_ = stage(tmp_path, database_url, minio, buckets, CASES[0])
    # When a real worker process claims it and exits (code 137) at the crash point
    crash_in_subprocess(stage_, point)
    check_state_after_crash(stage_, point, "process-1")
    # Then a fresh in-process worker finishes it
    finish_with_fresh_worker(stage_, "process-1")
