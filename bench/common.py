"""What every row shares: workloads, the uploader, results, process statistics, bucket checks."""

from __future__ import annotations

import io
import itertools
import os
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import urllib3
from minio import Minio
from minio.deleteobjects import DeleteObject

from reactor.devstack import MinioServer

KIB = 1024
MIB = 1024 * KIB
CLK_TCK = os.sysconf("SC_CLK_TCK")
TASK_PREFIX = "t"  # every workload key is t<task>/<n>.bin; canaries and nudges start with zz-


@dataclass(frozen=True)
class Workload:
    name: str
    count: int
    size: int
    tasks: int
    uploaders: int
    rate: float | None = None  # uploads per second, paced; None: as fast as MinIO takes them

    def describe(self) -> str:
        size = f"{self.size // MIB} MiB" if self.size >= MIB else f"{self.size // KIB} KiB"
        pace = f", paced at {self.rate:g}/s" if self.rate else ", as fast as possible"
        return (
            f"{self.name}: {self.count} x {size} over {self.tasks} task(s), "
            f"{self.uploaders} uploader(s){pace}"
        )

    def key(self, i: int) -> tuple[str, str]:
        """(task, key) of object i."""
        task = f"{TASK_PREFIX}{i % self.tasks:03d}"
        return task, f"{task}/{i:06d}.bin"


def workloads(*, quick: bool) -> dict[str, Workload]:
    """The issue's workloads; --quick divides the counts by 10 (at least 2 objects)."""

    def n(full: int) -> int:
        return max(2, full // 10) if quick else full

    return {
        w.name: w
        for w in (
            Workload("spread", n(2000), 16 * KIB, 100, 16),
            Workload("one-task", n(500), 16 * KIB, 1, 16),
            Workload("big", n(20), 64 * MIB, min(4, n(20)), 4),
            Workload("steady", n(1000), 16 * KIB, 100, 4, rate=100.0),
        )
    }


@dataclass(frozen=True)
class Uploaded:
    task: str
    key: str
    etag: str
    size: int
    started: float  # time.time() on this machine
    done: float


@dataclass
class RowResult:
    row: str
    workload: str
    count: int
    moved: int = 0  # targets present with the source gone, checked by listing both buckets
    moves_per_s: float | None = None
    latencies: list[float] = field(default_factory=list)  # seconds, upload completed -> source removed
    db_xacts: int | None = None
    cpu_seconds: float | None = None
    peak_rss_kib: int | None = None
    notes: list[str] = field(default_factory=list)
    extra: dict[str, float] = field(default_factory=dict)
    statements: dict[str, int] | None = None  # pg_stat_statements calls by statement, when loaded

    def percentile(self, p: float) -> float | None:
        return percentile(self.latencies, p)


def percentile(values: Sequence[float], p: float) -> float | None:
    """Nearest-rank percentile (p in 0..100), None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(p / 100.0 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def s3_client(minio: MinioServer, *, pool: int = 32, timeout: float = 120.0) -> Minio:
    """A minio-py client with a pool sized for the bench's threads and bounded timeouts and retries."""
    http = urllib3.PoolManager(
        # urllib3 sends a request body under the connect timeout: a 64 MiB PUT to a busy MinIO needs more
        # than a few seconds of it.
        timeout=urllib3.Timeout(connect=timeout, read=timeout),
        retries=urllib3.Retry(
            total=2, connect=2, read=0, backoff_factor=0.2, status_forcelist=(502, 503, 504)
        ),
        maxsize=pool,
        block=False,
    )
    return Minio(
        minio.endpoint,
        access_key=minio.access_key,
        secret_key=minio.secret_key,
        secure=False,
        http_client=http,
    )


class Payloads:
    """Distinct bytes per object (an 8-byte counter over one random block), without a fresh random
    block each time."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._block = os.urandom(size)

    def get(self, i: int) -> bytes:
        return i.to_bytes(8, "big") + self._block[8:] if self.size >= 8 else self._block


def upload_all(
    client: Minio,
    bucket: str,
    workload: Workload,
    *,
    deadline: float,
    on_uploaded: Callable[[Uploaded], None] | None = None,
) -> list[Uploaded]:
    """Upload the workload's objects with its uploader threads; single-part PUTs (part size = object
    size), so every ETag is the MD5 and every copy a plain server-side copy."""
    payloads = Payloads(workload.size)
    counter = itertools.count()
    lock = threading.Lock()
    results: list[Uploaded] = []
    errors: list[BaseException] = []
    part_size = max(5 * MIB, workload.size)
    t0 = time.monotonic()

    def worker() -> None:
        while True:
            with lock:
                i = next(counter)
            if i >= workload.count or errors or time.monotonic() > deadline:
                return
            if workload.rate:
                wait = t0 + i / workload.rate - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
            task, key = workload.key(i)
            data = payloads.get(i)
            started = time.time()
            try:
                result = client.put_object(bucket, key, io.BytesIO(data), len(data), part_size=part_size)
            except BaseException as exc:
                errors.append(exc)
                return
            item = Uploaded(
                task=task,
                key=key,
                etag=(result.etag or "").strip('"'),
                size=len(data),
                started=started,
                done=time.time(),
            )
            with lock:
                results.append(item)
            if on_uploaded is not None:
                on_uploaded(item)

    threads = [
        threading.Thread(target=worker, name=f"upload-{n}", daemon=True) for n in range(workload.uploaders)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()) + 5.0)
    if errors:
        raise RuntimeError(f"upload failed: {errors[0]!r}") from errors[0]
    return results


def list_keys(client: Minio, bucket: str, prefix: str = TASK_PREFIX) -> set[str]:
    return {
        str(o.object_name)
        for o in client.list_objects(bucket, prefix=prefix, recursive=True)
        if o.object_name is not None
    }


def check_moved(client: Minio, source: str, target: str, uploads: Iterable[Uploaded]) -> tuple[int, str]:
    """How many uploads are at the target and gone from the source; a note on anything else."""
    keys = {u.key for u in uploads}
    at_target = list_keys(client, target) & keys
    left = list_keys(client, source) & keys
    moved = len(at_target - left)
    note = ""
    if left:
        note = f"{len(left)} source(s) not removed"
    return moved, note


def empty_bucket(client: Minio, bucket: str) -> None:
    """Remove every object (workload, canaries, nudges) and the bucket; best effort."""
    try:
        names = [str(o.object_name) for o in client.list_objects(bucket, recursive=True) if o.object_name]
        for batch in _batched(names):
            for _error in client.remove_objects(bucket, [DeleteObject(n) for n in batch]):
                pass
        client.remove_bucket(bucket)
    except Exception as exc:  # cleanup only: a leftover bucket dies with the MinIO data dir
        print(f"  (cleanup of bucket {bucket} failed: {exc})", flush=True)


def _batched(names: list[str], n: int = 1000) -> Iterable[list[str]]:
    for i in range(0, len(names), n):
        yield names[i : i + n]


# --------------------------------------------------------------------------------------------------
# Process statistics from /proc (psutil is not a dependency)


def cpu_seconds(pid: int) -> float | None:
    """utime + stime of a process, in seconds."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2 :].split()
    # fields[0] is field 3 (state): utime is field 14, stime field 15.
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def peak_rss_kib(pid: int) -> int | None:
    """VmHWM: the peak resident set size of a process, in KiB."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None
