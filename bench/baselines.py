"""The rows without a database: `raw` (the physical limit), `seed-style` (what teams write by hand) and
`serial` (the ordering floor: the reactor's own mover, one move at a time).

Both get each upload in-process the moment its PUT returns, so they pay nothing for ingestion: they
are the yardstick, not a fair peer on durability. CPU is the mover threads' own (time.thread_time),
so the uploader's work is not counted.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import defaultdict
from collections.abc import Callable

from minio import Minio
from minio.commonconfig import CopySource

from bench.common import RowResult, Uploaded, Workload, check_moved, upload_all
from reactor.mover import MoveOrder, Mover
from reactor.objectstore import MinioStore


class _Tally:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.removed: dict[str, float] = {}
        self.cpu = 0.0
        self.errors: list[str] = []

    def done(self, key: str) -> None:
        with self.lock:
            self.removed[key] = time.time()

    def error(self, key: str, exc: BaseException) -> None:
        with self.lock:
            self.errors.append(f"{key}: {type(exc).__name__}: {exc}")

    def add_cpu(self) -> None:
        spent = time.thread_time()
        with self.lock:
            self.cpu += spent


def _finish(  # noqa: PLR0917
    row: str,
    workload: Workload,
    client: Minio,
    source: str,
    target: str,
    uploads: list[Uploaded],
    tally: _Tally,
) -> RowResult:
    result = RowResult(row=row, workload=workload.name, count=workload.count)
    result.moved, note = check_moved(client, source, target, uploads)
    if note:
        result.notes.append(note)
    if tally.errors:
        result.notes.append(f"{len(tally.errors)} error(s), first: {tally.errors[0]}")
    if uploads and tally.removed:
        first = min(u.started for u in uploads)
        result.moves_per_s = len(tally.removed) / max(1e-9, max(tally.removed.values()) - first)
        result.latencies = [tally.removed[u.key] - u.done for u in uploads if u.key in tally.removed]
    result.cpu_seconds = tally.cpu
    result.db_xacts = 0
    return result


def _queue_movers(
    row: str,
    client: Minio,
    source: str,
    target: str,
    workload: Workload,
    *,
    threads: int,
    deadline: float,
    move: Callable[[Uploaded], None],
) -> RowResult:
    """`threads` threads take uploads from a queue, in arrival order, and `move` each (an exception
    counts as an error); the uploads reach the queue the moment their PUT returns."""
    todo: queue.Queue[Uploaded | None] = queue.Queue()
    tally = _Tally()

    def worker() -> None:
        try:
            while time.monotonic() < deadline:
                try:
                    item = todo.get(timeout=0.5)
                except queue.Empty:
                    continue
                if item is None:
                    return
                try:
                    move(item)
                except Exception as exc:
                    tally.error(item.key, exc)
                    continue
                tally.done(item.key)
        finally:
            tally.add_cpu()

    pool = [threading.Thread(target=worker, name=f"{row}-{n}", daemon=True) for n in range(threads)]
    for thread in pool:
        thread.start()
    try:
        uploads = upload_all(client, source, workload, deadline=deadline, on_uploaded=todo.put)
    finally:
        for _ in pool:
            todo.put(None)
        for thread in pool:
            thread.join(max(0.0, deadline - time.monotonic()) + 1.0)
    return _finish(row, workload, client, source, target, uploads, tally)


def run_raw(
    client: Minio, source: str, target: str, workload: Workload, *, concurrency: int, deadline: float
) -> RowResult:
    """A bare loop of `concurrency` threads: copy (if-match) + stat + remove; no database, no order."""

    def move(item: Uploaded) -> None:
        client.copy_object(target, item.key, CopySource(source, item.key, match_etag=item.etag))
        stat = client.stat_object(target, item.key)
        if (stat.etag or "").strip('"') != item.etag or stat.size != item.size:
            raise RuntimeError(f"target differs: {stat.etag} {stat.size}")
        client.remove_object(source, item.key)

    return _queue_movers(
        "raw", client, source, target, workload, threads=concurrency, deadline=deadline, move=move
    )


def run_seed(client: Minio, source: str, target: str, workload: Workload, *, deadline: float) -> RowResult:
    """The common hand-written fix: one thread per event, an in-process mutex per task, copy + remove.
    No verification, no durability, and threading.Lock is not FIFO, so a task's moves may run out of
    upload order."""
    tally = _Tally()
    locks: defaultdict[str, threading.Lock] = defaultdict(threading.Lock)
    guard = threading.Lock()
    threads: list[threading.Thread] = []

    def move(item: Uploaded) -> None:
        try:
            with guard:
                lock = locks[item.task]
            with lock:
                if time.monotonic() > deadline:
                    return
                try:
                    client.copy_object(target, item.key, CopySource(source, item.key))
                    client.remove_object(source, item.key)
                except Exception as exc:
                    tally.error(item.key, exc)
                    return
                tally.done(item.key)
        finally:
            tally.add_cpu()

    def on_event(item: Uploaded) -> None:
        thread = threading.Thread(target=move, args=(item,), name=f"seed-{item.key}", daemon=True)
        with guard:
            threads.append(thread)
        thread.start()

    try:
        uploads = upload_all(client, source, workload, deadline=deadline, on_uploaded=on_event)
    finally:
        with guard:
            started = list(threads)
        for thread in started:
            thread.join(max(0.0, deadline - time.monotonic()) + 1.0)
    return _finish("seed-style", workload, client, source, target, uploads, tally)


def run_serial(
    client: Minio, store: MinioStore, source: str, target: str, workload: Workload, *, deadline: float
) -> RowResult:
    """ONE thread runs reactor.mover.Mover (copy if-match, verify, check the source, delete) on every
    upload in arrival order: what any mover that runs moves strictly one at a time, verified, can
    reach against this MinIO, with no database and free in-process events. The one-task workload's
    ceiling for every ordered row, the reactor's included."""
    mover = Mover(store)

    def move(item: Uploaded) -> None:
        order = MoveOrder(
            source_bucket=source,
            source_key=item.key,
            version_id="",
            etag=item.etag,
            size=item.size,
            target_bucket=target,
            target_key=item.key,
        )
        result = mover.execute(order)
        if result.status.value != "done":
            raise RuntimeError(f"{result.status.value}: {result.error or result.note}")

    return _queue_movers("serial", client, source, target, workload, threads=1, deadline=deadline, move=move)
