"""The chaos scenario: real reactor processes killed on purpose while uploads pour in, then an audit.

Layout (its own MinIO and PostgreSQL, because it restarts both):

- bucket ``chaos-hooked`` (versioned) is subscribed to TWO webhook targets with on-disk queues:
  PRIMARY posts to instance 1, SECONDARY to instance 2, so every upload is delivered (at least)
  twice, each queue holding its events while its instance is down;
- bucket ``chaos-listened`` (unversioned) has no subscription: only instance 3 hears it, through
  ListenBucketNotification (it listens to chaos-hooked too, a third copy of those events);
- every instance runs the reconcile sweep (short interval and grace), which is the only way back
  for uploads to chaos-listened made while instance 3 is down;
- both rules move into ``chaos-moved`` and share their order keys (the task), so one key's
  sequence mixes moves from every way in.

Overwrites go to the versioned bucket only: in an unversioned bucket the README documents a
window (between the ETag check and the DELETE) in which a newer upload can be deleted, and a
scenario that overwrites "a moment later" would hit it by design, not by bug.

During the load: kill -9 of a random instance every 2-5 s (restarted at once on the same port),
one MinIO restart (uploads pause while it restarts, so that the uploader knows exactly which
uploads exist), one PostgreSQL crash-restart, and a blackout (the listen-only phase of issue 3) in
which every instance is down while uploads continue: what reached chaos-listened meanwhile can
only come back through the sweep. Afterwards it waits until every upload has a move and nothing is pending
or running, and audits MinIO's listings against ``reactor.move_history`` (see ``audit``).

``python -m tests.chaos.harness`` runs the full scenario and prints one summary line; it exits
non-zero when any invariant count is not 0. ``--short`` runs the version in ``make test``.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import Counter, defaultdict
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any

import psycopg
from minio import Minio
from minio.commonconfig import ENABLED
from minio.notificationconfig import NotificationConfig, QueueConfig
from minio.versioningconfig import VersioningConfig
from psycopg.rows import dict_row
from sqlalchemy.engine import make_url

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
from tests.support.stack import base_env

HOOKED = "chaos-hooked"  # versioned; two webhook targets, and instance 3 listens
LISTENED = "chaos-listened"  # unversioned; listen (instance 3) and the sweep only
MOVED = "chaos-moved"
TOKEN = "chaos-token"
TARGET_IDS = ("PRIMARY", "SECONDARY")  # webhook target i posts to instance i + 1
DATABASE = "chaos"
PART_SIZE = 5 * 1024 * 1024
UPLOAD_EVENTS = ["s3:ObjectCreated:Put", "s3:ObjectCreated:Post", "s3:ObjectCreated:CompleteMultipartUpload"]
TASK_STYLES = ("task {i}", "t+{i}", "t%{i}", "任务{i}", "cam{i}")
FILE_STYLES = ("img {n}.jpg", "a+b {n}.jpg", "100% {n}.jpg", "猫 {n}.jpg", "{n}.bin")


@dataclass(frozen=True, kw_only=True)
class Params:
    """One scenario; the defaults are the full run of issue 3."""

    name: str = "full"
    uploads: int = 3000
    tasks: int = 60
    uploaders: int = 8
    concurrency: int = 4
    overwrite_fraction: float = 0.05  # of all uploads: a second upload of a key a moment later
    listened_fraction: float = 0.3  # of the first uploads of keys: into the listen-only bucket
    multipart_fraction: float = 0.005  # of the first uploads: 5-6 MiB, two parts
    load_seconds: float = 75.0  # uploads are spread evenly over this long
    kill_every: tuple[float, float] = (2.0, 5.0)
    minio_restart_at: float | None = 0.3  # as a fraction of the load phase
    minio_down_seconds: float = 3.0  # long enough that moves fail and are retried
    postgres_restart_at: float | None = 0.5
    postgres_down_seconds: float = 2.0
    blackout_at: float | None = 0.7
    blackout_seconds: float = 10.0
    lease_seconds: float = 3.0
    reconcile_interval: float = 5.0
    reconcile_grace: float = 2.0
    # Kills and the MinIO outage count as attempts: the default 5 would turn a move killed a few
    # times, or retried through the outage, into `failed` although no fault here is permanent.
    max_attempts: int = 20
    retry_max_delay: float = 4.0
    drain_timeout: float = 120.0
    seed: int | None = None
    keep: bool = False  # keep the state dir (data, logs) even when every invariant held


FULL = Params()
SHORT = Params(
    name="short",
    uploads=300,
    tasks=12,
    uploaders=4,
    load_seconds=25.0,
    multipart_fraction=0.01,
    blackout_seconds=4.0,
)


@dataclass(kw_only=True)
class Summary:
    name: str
    seed: int
    uploads: int = 0
    moves: int = 0
    # The invariants of issue 3 (see audit for the exact definitions)
    lost: int = 0
    duplicated: int = 0
    misordered: int = 0
    mixed_up: int = 0
    deleted_unmoved: int = 0
    failed: int = 0
    # Further things that must not happen
    stale: int = 0  # a key's last upload was moved, yet its target holds other bytes
    leftover: int = 0  # a done move whose source version is still there
    gaps: int = 0  # an order key whose seqs are not 1..n
    phantom: int = 0  # moves naming an upload that never happened (a key decoded wrongly, say)
    stuck: int = 0  # still pending or running when the drain gave up
    unexpected_exits: int = 0  # an instance that died without being killed
    upload_errors: int = 0  # uploads the uploader could not complete (the audit cannot judge them)
    # What happened
    kills: int = 0
    restarts: int = 0
    minio_restarts: int = 0
    postgres_restarts: int = 0
    via: dict[str, int] = field(default_factory=dict)  # the way in that created each move
    webhook_backlog: dict[str, int] = field(default_factory=dict)  # events still in MinIO's queues
    lease_expired: int = 0  # moves cut short by a kill and given back by lease recovery
    retries: int = 0  # attempts that failed (MinIO or PostgreSQL away) and were scheduled again
    moves_per_second: float = 0.0
    drain_seconds: float = 0.0
    drained: bool = False
    wall_seconds: float = 0.0
    examples: list[str] = field(default_factory=list)
    unexercised: list[str] = field(default_factory=list)  # parts of the scenario that did not happen
    state_dir: str = ""

    INVARIANTS = (
        "lost",
        "duplicated",
        "misordered",
        "mixed_up",
        "deleted_unmoved",
        "failed",
        "stale",
        "leftover",
        "gaps",
        "phantom",
        "stuck",
        "unexpected_exits",
        "upload_errors",
    )

    @property
    def ok(self) -> bool:
        return (
            self.drained
            and not self.unexercised
            and all(getattr(self, name) == 0 for name in self.INVARIANTS)
        )

    def line(self) -> str:
        counts = " ".join(f"{name}={getattr(self, name)}" for name in self.INVARIANTS)
        via = ",".join(f"{k}:{v}" for k, v in sorted(self.via.items()))
        backlog = ",".join(f"{k}:{v}" for k, v in sorted(self.webhook_backlog.items()))
        text = (
            f"chaos[{self.name} seed={self.seed}] {'PASS' if self.ok else 'FAIL'}: {counts} | "
            f"uploads={self.uploads} moves={self.moves} via={via or '-'} "
            f"webhook_backlog={backlog or '-'} lease_expired={self.lease_expired} retries={self.retries} "
            f"| kills={self.kills} "
            f"restarts={self.restarts} minio_restarts={self.minio_restarts} "
            f"postgres_restarts={self.postgres_restarts} | moves_per_s={self.moves_per_second:.1f} "
            f"drain_s={self.drain_seconds:.1f}{'' if self.drained else ' (timed out)'} "
            f"wall_s={self.wall_seconds:.1f}"
        )
        if self.unexercised:
            text += f" | unexercised={';'.join(self.unexercised)}"
        if self.state_dir:
            text += f" | state={self.state_dir}"
        return text


# --------------------------------------------------------------------------------------------------
# The uploads


@dataclass(frozen=True, kw_only=True)
class Job:
    bucket: str
    key: str
    size: int
    multipart: bool
    overwrite: bool  # upload the key again a moment after this upload returned


@dataclass(frozen=True, kw_only=True)
class Uploaded:
    """One completed upload as the uploader saw it."""

    bucket: str
    key: str
    etag: str
    version_id: str  # "" in the unversioned bucket
    sha256: str
    finished: float  # monotonic; orders the uploads of one key

    @property
    def ident(self) -> tuple[str, str, str, str]:
        return (self.bucket, self.key, self.version_id, self.etag)


def plan(params: Params, rng: random.Random) -> list[Job]:
    """The first uploads of keys, in upload order; some carry an overwrite that follows them."""
    overwrites = round(params.uploads * params.overwrite_fraction)
    firsts = params.uploads - overwrites
    tasks = [TASK_STYLES[i % len(TASK_STYLES)].format(i=i) for i in range(params.tasks)]
    counters: Counter[tuple[str, str]] = Counter()
    jobs: list[Job] = []
    for _ in range(firsts):
        task = rng.choice(tasks)
        bucket = LISTENED if rng.random() < params.listened_fraction else HOOKED
        n = counters[(bucket, task)] = counters[(bucket, task)] + 1
        filename = FILE_STYLES[n % len(FILE_STYLES)].format(n=n)
        key = f"det/{task}/{filename}" if bucket == HOOKED else f"{task}/{filename}"
        multipart = rng.random() < params.multipart_fraction
        size = PART_SIZE + rng.randint(1, 1024 * 1024) if multipart else rng.randint(64, 32 * 1024)
        jobs.append(Job(bucket=bucket, key=key, size=size, multipart=multipart, overwrite=False))
    candidates = [i for i, job in enumerate(jobs) if job.bucket == HOOKED and not job.multipart]
    for i in rng.sample(candidates, min(overwrites, len(candidates))):
        jobs[i] = replace(jobs[i], overwrite=True)
    return jobs


class Gate:
    """Uploads pass while open; close() waits for the uploads in flight to return."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._open = True
        self._in_flight = 0

    @contextlib.contextmanager
    def passage(self, timeout: float = 120.0) -> Iterator[None]:
        with self._cond:
            if not self._cond.wait_for(lambda: self._open, timeout=timeout):
                raise TimeoutError("the upload gate stayed closed")
            self._in_flight += 1
        try:
            yield
        finally:
            with self._cond:
                self._in_flight -= 1
                self._cond.notify_all()

    def close(self, timeout: float = 60.0) -> None:
        with self._cond:
            self._open = False
            if not self._cond.wait_for(lambda: self._in_flight == 0, timeout=timeout):
                raise TimeoutError("uploads in flight did not return")

    def open(self) -> None:
        with self._cond:
            self._open = True
            self._cond.notify_all()


class Uploaders:
    """N threads uploading the planned jobs at a steady pace; every completed upload is recorded."""

    def __init__(self, client: Minio, jobs: Sequence[Job], params: Params, seed: int) -> None:
        self.client = client
        self.jobs = list(jobs)
        self.params = params
        self.seed = seed
        self.gate = Gate()
        self.done: list[Uploaded] = []
        self.errors: list[str] = []
        self.retries = 0
        self._next = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._start = 0.0

    def start(self) -> None:
        self._start = time.monotonic()
        for n in range(self.params.uploaders):
            thread = threading.Thread(target=self._run, args=(n,), name=f"uploader-{n}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def join(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        return not any(t.is_alive() for t in self._threads)

    def stop(self) -> None:
        self._stop.set()
        self.gate.open()
        self.join(60.0)

    def _take(self) -> tuple[int, Job] | None:
        with self._lock:
            if self._next >= len(self.jobs):
                return None
            i = self._next
            self._next += 1
            return i, self.jobs[i]

    def _run(self, n: int) -> None:
        rng = random.Random(self.seed * 1000 + n)
        interval = self.params.load_seconds / max(1, len(self.jobs))
        while not self._stop.is_set():
            taken = self._take()
            if taken is None:
                return
            i, job = taken
            self._stop.wait(max(0.0, self._start + i * interval - time.monotonic()))
            if self._stop.is_set():
                return
            try:
                self._put(job, rng.randbytes(job.size))
                if job.overwrite:
                    self._stop.wait(rng.uniform(0.0, 0.3))
                    self._put(job, rng.randbytes(rng.randint(64, 32 * 1024)))
            except Exception as exc:  # recorded: the audit cannot judge an upload of unknown state
                with self._lock:
                    self.errors.append(f"{job.bucket}/{job.key}: {type(exc).__name__}: {exc}")

    def _put(self, job: Job, data: bytes) -> None:
        last: Exception | None = None
        for attempt in range(8):
            try:
                with self.gate.passage():
                    if job.multipart and len(data) > PART_SIZE:
                        result = self.client.put_object(
                            job.bucket, job.key, io.BytesIO(data), -1, part_size=PART_SIZE
                        )
                    else:
                        result = self.client.put_object(job.bucket, job.key, io.BytesIO(data), len(data))
            except Exception as exc:  # MinIO restarting: try again (the gate makes this rare)
                last = exc
                with self._lock:
                    self.retries += 1
                self._stop.wait(min(0.25 * 2**attempt, 4.0))
                continue
            record = Uploaded(
                bucket=job.bucket,
                key=job.key,
                etag=(result.etag or "").strip('"'),
                version_id=result.version_id or "",
                sha256=hashlib.sha256(data).hexdigest(),
                finished=time.monotonic(),
            )
            with self._lock:
                self.done.append(record)
            return
        raise RuntimeError(f"upload failed 8 times: {last}")


# --------------------------------------------------------------------------------------------------
# Reactor instances


class Say:
    """Progress lines on stderr, with the seconds since the run began."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.t0 = time.monotonic()
        self.timeline: list[dict[str, Any]] = []

    def __call__(self, what: str, **fields: Any) -> None:
        at = round(time.monotonic() - self.t0, 2)
        self.timeline.append({"at": at, "what": what, **fields})
        extra = " ".join(f"{k}={v}" for k, v in fields.items())
        print(f"[chaos {self.name} {at:7.2f}s] {what} {extra}".rstrip(), file=sys.stderr, flush=True)


def http_status(url: str) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=1.0) as response:  # noqa: S310 - loopback http only
            return int(response.status)
    except urllib.error.HTTPError as exc:
        exc.close()
        return int(exc.code)
    except (OSError, ValueError):
        return None


class Instance:
    """One `reactor run` process slot: restarted on the same port, with a new instance id each time."""

    def __init__(self, number: int, port: int, env: Mapping[str, str], log_path: Path) -> None:
        self.number = number
        self.port = port
        self.env = dict(env)
        self.log_path = log_path
        self.generation = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.down = True  # killed on purpose and not started again yet

    @property
    def worker(self) -> str:
        return f"r{self.number}.{self.generation}"

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> None:
        self.generation += 1
        env = {**self.env, "REACTOR_INSTANCE_ID": self.worker}
        self.proc = spawn([*REACTOR_CLI, "run"], log_path=self.log_path, env=env, cwd=REPO_ROOT)
        self.down = False

    def kill(self) -> None:
        self.down = True
        if self.proc is not None:
            terminate(self.proc, signal.SIGKILL, 10.0)

    def stop(self) -> None:
        self.down = True
        if self.proc is not None:
            terminate(self.proc, signal.SIGTERM, 20.0)

    def died_unexpectedly(self) -> bool:
        return not self.down and self.proc is not None and self.proc.poll() is not None

    def wait_healthy(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while http_status(f"http://{LOOPBACK}:{self.port}/healthz") != 200:
            if not self.alive:
                raise StackError(
                    f"instance {self.worker} exited before /healthz answered; see {self.log_path}"
                )
            if time.monotonic() > deadline:
                raise StackError(
                    f"instance {self.worker} not healthy within {timeout:.0f}s; see {self.log_path}"
                )
            time.sleep(0.1)


# --------------------------------------------------------------------------------------------------
# The run


def conninfo(database_url: str) -> str:
    return make_url(database_url).set(drivername="postgresql").render_as_string(hide_password=False)


def query(database_url: str, text: str) -> list[dict[str, Any]]:
    """Run one read; bounded in time (connecting and running) so a starved server cannot hang us."""
    with psycopg.connect(
        conninfo(database_url),
        autocommit=True,
        row_factory=dict_row,
        connect_timeout=5,
        options="-c statement_timeout=30000",
    ) as c:
        return list(c.execute(text).fetchall())


def write_rules(path: Path) -> Path:
    rules = [
        {
            "name": "hooked",
            "source_bucket": HOOKED,
            "pattern": "{task_type}/{task_id}/{filename}",
            "target_bucket": MOVED,
            "target": "hooked/{task_type}/{task_id}/{filename}",
            "order_key": "{task_id}",
        },
        {
            "name": "listened",
            "source_bucket": LISTENED,
            "pattern": "{task_id}/{filename}",
            "target_bucket": MOVED,
            "target": "listened/{task_id}/{filename}",
            "order_key": "{task_id}",
        },
    ]
    lines: list[str] = []
    for rule in rules:
        lines.append("[[rules]]")
        lines.extend(f"{k} = {json.dumps(v)}" for k, v in rule.items())
        lines.append("")
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


class Scenario:
    def __init__(self, params: Params, root: Path) -> None:
        self.params = params
        self.seed = params.seed if params.seed is not None else random.randrange(1, 1 << 30)
        self.rng = random.Random(self.seed)
        self.root = root
        self.say = Say(params.name)
        self.summary = Summary(name=params.name, seed=self.seed)
        self.ports = [free_port() for _ in range(3)]
        self.pg = PostgresServer(
            root / "postgres", settings=TEST_PG_SETTINGS, log_path=root / "logs" / "postgres.log"
        )
        minio_env: dict[str, str] = {}
        for target_id, port in zip(TARGET_IDS, self.ports, strict=False):
            url = f"http://{LOOPBACK}:{port}{WEBHOOK_PATH}"
            minio_env.update(webhook_env(target_id, url, TOKEN, self.queue_dir(target_id)))
        self.minio = MinioServer(
            minio_binary(), root / "minio" / "data", env=minio_env, log_path=root / "logs" / "minio.log"
        )
        self.instances: list[Instance] = []
        self.database_url = ""
        self.uploaders: Uploaders | None = None

    # -- setup ------------------------------------------------------------------------------------

    @property
    def uploads_path(self) -> Path:
        """What the uploader recorded: with a kept state dir, `audit` can be run again on it."""
        return self.root / "uploads.json"

    def queue_dir(self, target_id: str) -> Path:
        return self.root / "minio" / f"queue-{target_id.lower()}"

    def env(self, **extra: str) -> dict[str, str]:
        env = base_env()
        env.update(
            REACTOR_DATABASE_URL=self.database_url,
            REACTOR_MINIO_ENDPOINT=self.minio.endpoint,
            REACTOR_MINIO_ACCESS_KEY=self.minio.access_key,
            REACTOR_MINIO_SECRET_KEY=self.minio.secret_key,
            REACTOR_RULES=str(self.root / "rules.toml"),
            REACTOR_WEBHOOK_TOKEN=TOKEN,
            REACTOR_LOG_LEVEL=os.environ.get("CHAOS_REACTOR_LOG_LEVEL", "INFO"),
        )
        env.update(extra)
        return env

    def setup(self) -> None:
        self.pg.start()
        self.pg.create_database(DATABASE)
        self.database_url = self.pg.url(DATABASE)
        self.minio.start()
        write_rules(self.root / "rules.toml")
        self.say("services up", postgres=self.pg.port, minio=self.minio.endpoint)

        # `reactor migrate` from three processes at once: all must succeed, and agree
        migrations = [
            subprocess.Popen(
                [*REACTOR_CLI, "migrate"],
                env=self.env(),
                cwd=REPO_ROOT,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            for _ in range(3)
        ]
        try:
            outputs = [p.communicate(timeout=120)[0] for p in migrations]
        finally:
            for p in migrations:
                if p.poll() is None:
                    p.kill()
                    p.wait()
        failed = [
            (p.returncode, out) for p, out in zip(migrations, outputs, strict=True) if p.returncode != 0
        ]
        if failed:
            raise AssertionError(f"concurrent `reactor migrate` failed: {failed}")
        versions = query(self.database_url, "SELECT version_num FROM reactor.alembic_version")
        if len(versions) != 1:
            raise AssertionError(f"after three concurrent migrations alembic_version holds {versions}")
        self.say("migrated from three processes at once", version=versions[0]["version_num"])

        # `reactor setup` creates the buckets and subscribes both sources to PRIMARY; then the
        # hooked bucket is versioned and also subscribed to SECONDARY, the listened one to nothing.
        setup = subprocess.run(
            [*REACTOR_CLI, "setup"],
            env=self.env(REACTOR_NOTIFY_ARN=webhook_arn(TARGET_IDS[0])),
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        if setup.returncode != 0:
            raise AssertionError(f"reactor setup failed: {setup.stdout}{setup.stderr}")
        client = self.minio.client()
        client.set_bucket_versioning(HOOKED, VersioningConfig(ENABLED))
        current = client.get_bucket_notification(HOOKED)
        client.set_bucket_notification(
            HOOKED,
            NotificationConfig(
                queue_config_list=[
                    *current.queue_config_list,
                    QueueConfig(
                        queue=webhook_arn(TARGET_IDS[1]), events=UPLOAD_EVENTS, config_id="chaos-2nd"
                    ),
                ]
            ),
        )
        client.delete_bucket_notification(LISTENED)
        arns = sorted(q.queue or "" for q in client.get_bucket_notification(HOOKED).queue_config_list)
        self.say("buckets set up", hooked_arns=arns)

        common = {
            "REACTOR_CONCURRENCY": str(self.params.concurrency),
            "REACTOR_LEASE_SECONDS": str(self.params.lease_seconds),
            "REACTOR_MAX_ATTEMPTS": str(self.params.max_attempts),
            "REACTOR_RETRY_BASE_DELAY": "0.5",
            "REACTOR_RETRY_MAX_DELAY": str(self.params.retry_max_delay),
            "REACTOR_RECONCILE_INTERVAL": str(self.params.reconcile_interval),
            "REACTOR_RECONCILE_GRACE": str(self.params.reconcile_grace),
        }
        for number, port in enumerate(self.ports, start=1):
            extra = {**common, "REACTOR_HTTP_ADDR": f"{LOOPBACK}:{port}"}
            if number == 3:
                extra["REACTOR_LISTEN"] = "true"
            log_path = self.root / "logs" / f"reactor-{number}.log"
            self.instances.append(Instance(number, port, self.env(**extra), log_path))
        for instance in self.instances:
            instance.start()
        for instance in self.instances:
            instance.wait_healthy()
        self.say("instances up", ports=self.ports)

    # -- faults -----------------------------------------------------------------------------------

    def kill_and_restart(self, instance: Instance) -> None:
        worker = instance.worker
        instance.kill()
        instance.start()
        self.summary.kills += 1
        self.summary.restarts += 1
        self.say("killed and restarted", killed=worker, started=instance.worker)

    def restart_minio(self) -> None:
        assert self.uploaders is not None
        self.uploaders.gate.close()
        try:
            self.minio.stop()
            time.sleep(self.params.minio_down_seconds)
            self.minio.start()
        finally:
            self.uploaders.gate.open()
        self.summary.minio_restarts += 1
        self.say("minio restarted", down_s=self.params.minio_down_seconds)

    def restart_postgres(self) -> None:
        self.pg.stop("immediate")
        time.sleep(self.params.postgres_down_seconds)
        self.pg.start()
        self.summary.postgres_restarts += 1
        self.say("postgres crash-restarted", down_s=self.params.postgres_down_seconds)

    def blackout(self) -> None:
        for instance in self.instances:
            instance.kill()
            self.summary.kills += 1
        self.say("blackout: every instance killed", seconds=self.params.blackout_seconds)
        time.sleep(self.params.blackout_seconds)
        for instance in self.instances:
            instance.start()
            self.summary.restarts += 1
        self.say("blackout over: every instance restarted")

    def watch(self) -> None:
        for instance in self.instances:
            if instance.died_unexpectedly():
                code = instance.proc.returncode if instance.proc is not None else None
                self.summary.unexpected_exits += 1
                self.summary.examples.append(f"instance {instance.worker} exited by itself with {code}")
                self.say("instance exited by itself", worker=instance.worker, code=code)
                instance.start()
                self.summary.restarts += 1

    def chaos(self, end: float) -> None:
        """Runs in the main thread (children it spawns die with us): kills and the one-off faults."""
        p = self.params
        start = time.monotonic()
        one_offs = sorted(
            (start + at * p.load_seconds, name, action)
            for at, name, action in (
                (p.minio_restart_at, "minio", self.restart_minio),
                (p.postgres_restart_at, "postgres", self.restart_postgres),
                (p.blackout_at, "blackout", self.blackout),
            )
            if at is not None
        )
        next_kill = start + self.rng.uniform(*p.kill_every)
        while time.monotonic() < end:
            now = time.monotonic()
            self.watch()
            if one_offs and one_offs[0][0] <= now:
                _, _, action = one_offs.pop(0)
                action()
                # kills go on at their own pace; one that fell due meanwhile follows at once
            elif now >= next_kill:
                self.kill_and_restart(self.rng.choice(self.instances))
                next_kill = now + self.rng.uniform(*p.kill_every)
            time.sleep(0.05)
        for _, _, action in one_offs:  # a short load still gets every fault
            action()

    # -- draining ---------------------------------------------------------------------------------

    def drain(self, uploads: Sequence[Uploaded]) -> None:
        """Wait until every upload has a move and nothing is pending or running (bounded)."""
        wanted = {u.ident for u in uploads}
        started = time.monotonic()
        deadline = started + self.params.drain_timeout
        last = ""
        counts: dict[str, int] = {}
        known: set[tuple[str, str, str, str]] = set()
        while True:
            self.watch()
            try:
                counts = {
                    r["status"]: r["n"]
                    for r in query(
                        self.database_url, "SELECT status, count(*) AS n FROM reactor.move_history GROUP BY 1"
                    )
                }
                known = {
                    (r["source_bucket"], r["source_key"], r["vid"], r["etag"])
                    for r in query(
                        self.database_url,
                        "SELECT DISTINCT source_bucket, source_key, etag, "
                        "coalesce(source_version_id, '') AS vid FROM reactor.move_history",
                    )
                }
            except psycopg.Error as exc:  # the last counts stand; try again
                counts["unreachable"] = 1
                self.say("drain: database unreachable", error=str(exc)[:120])
            open_ = counts.get("pending", 0) + counts.get("running", 0)
            missing = len(wanted - known)
            state = f"open={open_} missing={missing} statuses={dict(sorted(counts.items()))}"
            if state != last:
                self.say("drain", state=state)
                last = state
            if open_ == 0 and missing == 0 and "unreachable" not in counts:
                self.summary.drained = True
                break
            if time.monotonic() > deadline:
                self.summary.stuck = open_
                if missing:
                    sample = sorted(wanted - known)[:5]
                    self.summary.examples.append(
                        f"drain timed out; {missing} uploads have no move, e.g. {sample}"
                    )
                break
            time.sleep(0.5)
        self.summary.drain_seconds = time.monotonic() - started

    # -- the whole run ----------------------------------------------------------------------------

    def run(self) -> Summary:
        p = self.params
        began = time.monotonic()
        self.setup()
        jobs = plan(p, self.rng)
        self.uploaders = Uploaders(self.minio.client(timeout=30.0), jobs, p, self.seed)
        self.say("load begins", uploads=p.uploads, first_uploads=len(jobs), uploaders=p.uploaders)
        self.uploaders.start()
        self.chaos(end=time.monotonic() + p.load_seconds)
        while not self.uploaders.join(timeout=1.0):  # uploads delayed by the faults catch up
            self.watch()
        self.say("load done", uploaded=len(self.uploaders.done), retries=self.uploaders.retries)
        for instance in self.instances:
            if not instance.alive:
                instance.start()
                self.summary.restarts += 1
        for instance in self.instances:
            instance.wait_healthy()
        uploads = list(self.uploaders.done)
        self.uploads_path.write_text(json.dumps([asdict(u) for u in uploads], ensure_ascii=False))
        self.drain(uploads)
        for instance in self.instances:
            instance.stop()
        self.summary.webhook_backlog = {
            target_id: sum(1 for _ in self.queue_dir(target_id).rglob("*.event")) for target_id in TARGET_IDS
        }
        self.say("instances stopped; auditing", webhook_backlog=self.summary.webhook_backlog)
        self.summary.upload_errors = len(self.uploaders.errors)
        self.summary.examples.extend(self.uploaders.errors[:5])
        if self.uploaders.retries:
            self.summary.examples.append(
                f"note: {self.uploaders.retries} PUTs were retried; one that failed on the client may still "
                "have been stored, an upload the audit does not know (a possible false `duplicated`)"
            )
        audit(self.summary, uploads, self.database_url, self.minio.client(timeout=30.0))
        # The scenario must have gone through what it claims to test
        if not self.summary.via.get("listen"):
            self.summary.unexercised.append("no move came in by listening")
        if p.blackout_at is not None and not any(
            m.via == "sweep" and m.source_bucket == LISTENED for m in load_moves(self.database_url)[0]
        ):
            self.summary.unexercised.append("the sweep recovered nothing of the listen-only bucket")
        self.summary.wall_seconds = time.monotonic() - began
        return self.summary

    def close(self) -> None:
        if self.uploaders is not None:
            self.uploaders.stop()
        for instance in self.instances:
            instance.stop()
        self.minio.stop()
        self.pg.stop("immediate")
        (self.root / "timeline.json").write_text(json.dumps(self.say.timeline, indent=1, default=str))


# --------------------------------------------------------------------------------------------------
# The audit


@dataclass(frozen=True, kw_only=True)
class Move:
    move_id: int
    order_key: str
    seq: int
    source_bucket: str
    source_key: str
    version_id: str
    etag: str
    target_bucket: str
    target_key: str
    status: str
    via: str
    started_at: datetime | None
    finished_at: datetime | None

    @property
    def ident(self) -> tuple[str, str, str, str]:
        return (self.source_bucket, self.source_key, self.version_id, self.etag)


def load_moves(database_url: str) -> tuple[list[Move], dict[int, list[tuple[str, datetime]]]]:
    moves = [
        Move(
            move_id=r["move_id"],
            order_key=r["order_key"],
            seq=r["seq"],
            source_bucket=r["source_bucket"],
            source_key=r["source_key"],
            version_id=r["source_version_id"] or "",
            etag=r["etag"],
            target_bucket=r["target_bucket"],
            target_key=r["target_key"],
            status=r["status"],
            via=r["via"],
            started_at=r["started_at"],
            finished_at=r["finished_at"],
        )
        for r in query(database_url, "SELECT * FROM reactor.move_history ORDER BY order_key, seq")
    ]
    events: dict[int, list[tuple[str, datetime]]] = defaultdict(list)
    for r in query(database_url, "SELECT move_id, kind, at FROM reactor.move_events ORDER BY at, id"):
        events[r["move_id"]].append((r["kind"], r["at"]))
    return moves, events


def object_sha256(client: Minio, bucket: str, key: str) -> str:
    response = client.get_object(bucket, key)
    try:
        return hashlib.sha256(response.read()).hexdigest()
    finally:
        response.close()
        response.release_conn()


def audit(summary: Summary, uploads: Sequence[Uploaded], database_url: str, client: Minio) -> None:
    """Fill the invariant counts from MinIO's listings and reactor.move_history / move_events.

    For each upload u (as the uploader recorded it; "newer" = a later upload of the same key):
      present(u)      the source still holds u: its version exists (versioned bucket), or the key's
                      current ETag is u's (unversioned)
      lost            u's bytes are at no target, and u is still present, and u is not an older
                      version that the reactor superseded for a newer upload of its key
      duplicated      u has more than one `done` move
      deleted unmoved u is no longer present, has no `done` move, and was not simply overwritten
                      (an older upload to the same key of the unversioned bucket)
      stale           u is the last upload of its key and has a `done` move, but its target does
                      not hold u's bytes (an older version was written over it)
      leftover        u has a `done` move yet is still present
    For each target object t:
      mixed up        t's sha256 differs from that of the upload named by t's last `done` move
                      (by finished_at), or t has no `done` move at all
    For each move:
      phantom         it names an upload (bucket, key, version, ETag) the uploader never made
    Per order key (from move_events):
      misordered      a move first claimed before a lower seq of its key reached done, superseded
                      or failed
      gaps            the key's seqs are not exactly 1..n
    And: failed = moves whose status is failed.
    """
    moves, events = load_moves(database_url)
    summary.uploads = len(uploads)
    summary.moves = len(moves)
    summary.via = dict(Counter(m.via for m in moves))
    summary.failed = sum(1 for m in moves if m.status == "failed")
    kinds = Counter(kind for trail in events.values() for kind, _ in trail)
    summary.lease_expired = kinds["lease_expired"]
    summary.retries = kinds["retry_scheduled"]
    summary.stuck = max(summary.stuck, sum(1 for m in moves if m.status in ("pending", "running")))
    examples = summary.examples

    def example(text: str) -> None:
        if len(examples) < 40:
            examples.append(text)

    for m in moves:
        if m.status == "failed":
            example(f"failed: move {m.move_id} {m.source_bucket}/{m.source_key}")

    # MinIO: what the sources still hold, and every target's bytes
    versions_present: set[tuple[str, str, str]] = set()
    current_etag: dict[tuple[str, str], str] = {}
    delete_markers = 0
    for bucket in (HOOKED, LISTENED):
        for obj in client.list_objects(bucket, recursive=True, include_version=bucket == HOOKED):
            name = str(obj.object_name)
            if obj.is_delete_marker:
                delete_markers += 1
                example(f"delete marker on {bucket}/{name} (a versioned source deleted without a version)")
                continue
            versions_present.add((bucket, name, obj.version_id or ""))
            if bucket == LISTENED:
                current_etag[(bucket, name)] = (obj.etag or "").strip('"')
    target_keys = [str(o.object_name) for o in client.list_objects(MOVED, recursive=True)]
    with ThreadPoolExecutor(8) as pool:
        target_sha = dict(
            zip(target_keys, pool.map(lambda k: object_sha256(client, MOVED, k), target_keys), strict=True)
        )
    target_shas = set(target_sha.values())

    by_upload: dict[tuple[str, str, str, str], list[Move]] = defaultdict(list)
    for m in moves:
        by_upload[m.ident].append(m)
    known = {u.ident for u in uploads}
    for ident, ms in by_upload.items():
        if ident not in known:
            summary.phantom += len(ms)
            example(f"phantom: moves {[m.move_id for m in ms]} name an upload nobody made: {ident}")

    latest: dict[tuple[str, str], float] = {}
    for u in uploads:
        latest[(u.bucket, u.key)] = max(latest.get((u.bucket, u.key), 0.0), u.finished)

    for u in uploads:
        ms = by_upload.get(u.ident, [])
        done = [m for m in ms if m.status == "done"]
        newer = u.finished < latest[(u.bucket, u.key)]
        versioned = bool(u.version_id)
        if versioned:
            present = (u.bucket, u.key, u.version_id) in versions_present
        else:
            present = current_etag.get((u.bucket, u.key)) == u.etag
        at_target = u.sha256 in target_shas
        where = f"{u.bucket}/{u.key} etag {u.etag} version {u.version_id or '-'}"
        trail = [(m.move_id, m.seq, m.status) for m in ms]
        if len(done) > 1:
            summary.duplicated += 1
            example(f"duplicated: {where}: moves {trail}")
        superseded_for_newer = newer and any(m.status == "superseded" for m in ms)
        if not at_target and present and not superseded_for_newer:
            summary.lost += 1
            example(f"lost: {where} is still in its source, at no target; moves {trail}")
        if not present and not done and not (not versioned and newer):
            summary.deleted_unmoved += 1
            example(f"deleted unmoved: {where} vanished without a done move; moves {trail}")
        if not newer and done and target_sha.get(done[-1].target_key) != u.sha256:
            summary.stale += 1
            example(f"stale: {where} was moved ({trail}) but its target holds other bytes")
        if done and present:
            summary.leftover += 1
            example(f"leftover: {where} is still in its source after done moves {trail}")

    sha_of = {(u.bucket, u.key, u.etag): u.sha256 for u in uploads}
    done_by_target: dict[str, list[Move]] = defaultdict(list)
    for m in moves:
        if m.status == "done" and m.target_bucket == MOVED:
            done_by_target[m.target_key].append(m)
    for key, sha in target_sha.items():
        candidates = done_by_target.get(key)
        if not candidates:
            summary.mixed_up += 1
            example(f"mixed up: target {MOVED}/{key} exists without any done move")
            continue
        last = max(candidates, key=lambda m: (m.finished_at or datetime.min, m.seq))
        expected = sha_of.get((last.source_bucket, last.source_key, last.etag))
        if expected != sha:
            summary.mixed_up += 1
            example(
                f"mixed up: target {MOVED}/{key} holds {sha[:12]}, "
                f"its last done move {last.move_id} names {expected}"
            )

    terminal = {"done", "superseded", "failed"}
    by_key: dict[str, list[Move]] = defaultdict(list)
    for m in moves:
        by_key[m.order_key].append(m)
    for key, ms in by_key.items():
        ms.sort(key=lambda m: m.seq)
        if [m.seq for m in ms] != list(range(1, len(ms) + 1)):
            summary.gaps += 1
            example(f"gaps: order key {key!r} has seqs {[m.seq for m in ms][:20]}")
        lower_end: datetime | None = None  # latest end among lower seqs so far
        lower_open = False  # some lower seq never ended
        for m in ms:
            timeline = events.get(m.move_id, [])
            claims = [at for kind, at in timeline if kind == "claimed"]
            ends = [at for kind, at in timeline if kind in terminal]
            if claims and (lower_open or (lower_end is not None and min(claims) < lower_end)):
                summary.misordered += 1
                example(
                    f"misordered: key {key!r} seq {m.seq} (move {m.move_id}) claimed before a lower seq ended"
                )
            if ends:
                end = max(ends)
                lower_end = end if lower_end is None or end > lower_end else lower_end
            else:
                lower_open = True

    done_moves = [m for m in moves if m.status == "done"]
    starts = [m.started_at for m in done_moves if m.started_at is not None]
    ends_ = [m.finished_at for m in done_moves if m.finished_at is not None]
    if starts and ends_:
        span = (max(ends_) - min(starts)).total_seconds()
        summary.moves_per_second = len(done_moves) / span if span > 0 else 0.0


# --------------------------------------------------------------------------------------------------
# Entry points


def run_scenario(params: Params) -> Summary:
    """Start everything, run the scenario, audit, stop everything; state is kept when it failed."""
    root = Path(tempfile.mkdtemp(prefix=f"reactor-chaos-{params.name}-"))
    root.chmod(0o755)  # PostgreSQL runs as another OS user when we are root
    scenario = Scenario(params, root)
    summary: Summary | None = None
    try:
        summary = scenario.run()
        return summary
    finally:
        scenario.close()
        keep = params.keep or summary is None or not summary.ok
        if keep:
            scenario.summary.state_dir = str(root)
            (root / "summary.json").write_text(json.dumps(asdict(scenario.summary), indent=1, default=str))
        else:
            shutil.rmtree(root, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.chaos.harness", description=__doc__.split("\n")[0])
    parser.add_argument("--short", action="store_true", help="the short version that `make test` runs")
    parser.add_argument("--seed", type=int, help="seed of the upload plan and the kill schedule")
    parser.add_argument("--keep", action="store_true", help="keep the state dir (data, logs) even on success")
    args = parser.parse_args(argv)
    params = replace(SHORT if args.short else FULL, seed=args.seed, keep=args.keep)
    summary = run_scenario(params)
    for line in summary.examples:
        print(f"  {line}", file=sys.stderr)
    print(summary.line(), flush=True)
    return 0 if summary.ok else 1


if __name__ == "__main__":
    sys.exit(main())
