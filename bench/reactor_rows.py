"""Reactor rows: real `python -m reactor.cli run` processes against the bench's MinIO and PostgreSQL,
with a fresh database (migrated) and fresh buckets for every row and workload."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
from minio import Minio

from bench.common import RowResult, Uploaded, Workload, check_moved, cpu_seconds, peak_rss_kib, upload_all
from bench.services import WEBHOOK_TOKEN, BenchMinio, calls_delta, fresh_database, statement_calls, xacts
from reactor.devstack import LOOPBACK, REACTOR_CLI, REPO_ROOT, PostgresServer, free_port, spawn, terminate


@dataclass(frozen=True)
class ReactorMode:
    row: str
    ingestion: str  # listen | webhook | webhook-queue
    instances: int


MODES: dict[str, ReactorMode] = {
    "listen": ReactorMode("reactor x1 listen", "listen", 1),
    "webhook": ReactorMode("reactor x1 webhook", "webhook", 1),
    "webhook-queue": ReactorMode("reactor x1 webhook+queue", "webhook-queue", 1),
    "x3": ReactorMode("reactor x3 listen+sweep", "listen", 3),
}

POLL_INTERVAL = 0.25


@dataclass
class _Instance:
    popen: subprocess.Popen[bytes]
    port: int
    log_path: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def get(self, path: str) -> tuple[int | None, str]:
        try:
            with urllib.request.urlopen(f"http://{LOOPBACK}:{self.port}{path}", timeout=2.0) as resp:
                return int(resp.status), resp.read().decode("utf-8", "replace")
        except urllib.error.HTTPError as exc:
            exc.close()
            return int(exc.code), ""
        except (OSError, ValueError):
            return None, ""

    def wait_healthy(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while self.get("/healthz")[0] != 200:
            if self.popen.poll() is not None:
                raise RuntimeError(f"reactor exited with {self.popen.returncode}; see {self.log_path}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"reactor not healthy within {timeout:.0f}s; see {self.log_path}")
            time.sleep(0.1)


def _env(
    *, database_url: str, minio: BenchMinio, rules: Path, mode: ReactorMode, port: int, name: str, conc: int
) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("REACTOR_")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    env.update(
        REACTOR_DATABASE_URL=database_url,
        REACTOR_MINIO_ENDPOINT=minio.server.endpoint,
        REACTOR_MINIO_ACCESS_KEY=minio.server.access_key,
        REACTOR_MINIO_SECRET_KEY=minio.server.secret_key,
        REACTOR_RULES=str(rules),
        REACTOR_HTTP_ADDR=f"{LOOPBACK}:{port}",
        REACTOR_INSTANCE_ID=name,
        REACTOR_CONCURRENCY=str(conc),
        REACTOR_LOG_LEVEL="INFO",
        REACTOR_WEBHOOK_TOKEN=WEBHOOK_TOKEN,
    )
    if mode.ingestion == "listen":
        env["REACTOR_LISTEN"] = "true"
    else:
        env["REACTOR_NOTIFY_ARN"] = minio.arn
    return env


def _write_rules(path: Path, source: str, target: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rule = {
        "name": "bench",
        "source_bucket": source,
        "pattern": "{task}/{name}",
        "target_bucket": target,
        "target": "{task}/{name}",
        "order_key": "{task}",
    }
    path.write_text("[[rules]]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in rule.items()))
    return path


_SAMPLE = re.compile(r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>[^}]*)\})?\s+(?P<value>\S+)$")


def _samples(text: str, name: str) -> Iterator[tuple[dict[str, str], float]]:
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match is None or match["name"] != name:
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', match["labels"] or ""))
        yield labels, float(match["value"])


def _listen_events(text: str) -> float:
    return sum(
        v for labels, v in _samples(text, "reactor_events_received_total") if labels.get("way") == "listen"
    )


def handler_stats(texts: list[str]) -> tuple[float | None, float | None, float]:
    """(p50 by linear interpolation in the histogram, mean, count) of 200-answered webhook POSTs."""
    buckets: dict[float, float] = {}
    total = count = 0.0
    for text in texts:
        for labels, value in _samples(text, "reactor_webhook_request_duration_seconds_bucket"):
            if labels.get("status") == "200":
                le = float("inf") if labels["le"] == "+Inf" else float(labels["le"])
                buckets[le] = buckets.get(le, 0.0) + value
        total += sum(
            v
            for lb, v in _samples(text, "reactor_webhook_request_duration_seconds_sum")
            if lb.get("status") == "200"
        )
        count += sum(
            v
            for lb, v in _samples(text, "reactor_webhook_request_duration_seconds_count")
            if lb.get("status") == "200"
        )
    if not count:
        return None, None, 0.0
    half = count / 2
    lower_le, lower_n = 0.0, 0.0
    p50 = None
    for le in sorted(buckets):
        n = buckets[le]
        if n >= half:
            p50 = (
                lower_le
                if le == float("inf")
                else lower_le + (le - lower_le) * (half - lower_n) / max(n - lower_n, 1e-9)
            )
            break
        lower_le, lower_n = le, n
    return p50, total / count, count


def _wait_listening(client: Minio, bucket: str, instances: list[_Instance], timeout: float = 60.0) -> None:
    """The listen stream has no handshake and MinIO buffers it: upload small canaries that match no rule
    until every instance's counter of listen events moves, then remove them."""
    deadline = time.monotonic() + timeout
    n = 0
    try:
        while time.monotonic() < deadline:
            client.put_object(bucket, f"zz-canary-{n}", io.BytesIO(b"."), 1)
            n += 1
            if all(_listen_events(inst.get("/metrics")[1]) > 0 for inst in instances):
                return
            time.sleep(0.1)
        raise RuntimeError(f"not every reactor heard a listen event on {bucket} within {timeout:.0f}s")
    finally:
        for i in range(n):
            with contextlib.suppress(Exception):
                client.remove_object(bucket, f"zz-canary-{i}")


@contextlib.contextmanager
def _nudging(client: Minio, bucket: str, enabled: bool) -> Iterator[None]:
    """MinIO sends a listen stream in batches of some KiB, so the last events of a burst wait for more
    traffic. While waiting for the tail, keep a trickle of small uploads that match no rule (five per
    second), as continuous real traffic would. They are left for the bucket cleanup."""
    stop = threading.Event()

    def run() -> None:
        n = 0
        while not stop.wait(0.2):
            with contextlib.suppress(Exception):
                client.put_object(bucket, f"zz-nudge-{n}", io.BytesIO(b"."), 1)
            n += 1

    thread = threading.Thread(target=run, name="nudge", daemon=True)
    if enabled:
        thread.start()
    try:
        yield
    finally:
        stop.set()
        if enabled:
            thread.join(5.0)


def run_reactor_row(  # noqa: PLR0915 - one straight sequence of steps
    mode: ReactorMode,
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
) -> RowResult:
    dbname, source, target = names
    database_url = fresh_database(pg, dbname)
    rules = _write_rules(root / "rules" / f"{dbname}.toml", source, target)
    result = RowResult(row=mode.row, workload=workload.name, count=workload.count)

    setup_env = _env(
        database_url=database_url,
        minio=minio,
        rules=rules,
        mode=mode,
        port=free_port(),
        name="setup",
        conc=concurrency,
    )
    done = subprocess.run(  # noqa: S603 - our own CLI
        [*REACTOR_CLI, "setup"],
        env=setup_env,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"reactor setup failed: {done.stdout}{done.stderr}")

    before = xacts(pg, dbname)
    calls_before = statement_calls(pg, dbname) if statements else {}
    polls = 0
    instances: list[_Instance] = []
    uploads: list[Uploaded] = []
    texts: list[str] = []
    try:
        for i in range(mode.instances):
            port = minio.webhook_port if mode.ingestion != "listen" and i == 0 else free_port()
            name = f"{dbname}-{i + 1}"
            env = _env(
                database_url=database_url,
                minio=minio,
                rules=rules,
                mode=mode,
                port=port,
                name=name,
                conc=concurrency,
            )
            log_path = root / "logs" / f"{name}.log"
            popen = spawn([*REACTOR_CLI, "run"], log_path=log_path, env=env, cwd=REPO_ROOT)
            instances.append(_Instance(popen=popen, port=port, log_path=log_path))
        for inst in instances:
            inst.wait_healthy()
        if mode.ingestion == "listen":
            _wait_listening(client, source, instances)
        cpu_before = sum(cpu_seconds(inst.pid) or 0.0 for inst in instances)

        uploads = upload_all(client, source, workload, deadline=deadline)
        with (
            psycopg.connect(pg.dsn(dbname), autocommit=True) as conn,
            _nudging(client, source, mode.ingestion == "listen"),
        ):
            finished = 0
            while time.monotonic() < deadline:
                row = conn.execute(
                    "SELECT /* bench */ count(*) FILTER (WHERE finished_at IS NOT NULL) FROM reactor.moves"
                ).fetchone()
                polls += 1
                finished = int(row[0]) if row else 0
                if finished >= len(uploads):
                    break
                time.sleep(POLL_INTERVAL)
            else:
                result.notes.append(f"timed out: {finished}/{len(uploads)} finished")
        result.cpu_seconds = sum(cpu_seconds(inst.pid) or 0.0 for inst in instances) - cpu_before
        result.peak_rss_kib = max((peak_rss_kib(inst.pid) or 0) for inst in instances)
        texts = [inst.get("/metrics")[1] for inst in instances]
    finally:
        for inst in instances:
            code = terminate(inst.popen, signal.SIGTERM, 20.0)
            if code not in (0, -signal.SIGTERM):
                result.notes.append(f"instance exited {code} (log {inst.log_path})")
    time.sleep(0.5)  # exiting backends have flushed their statistics by now
    result.db_xacts = max(0, xacts(pg, dbname) - before - polls)
    if statements:
        result.statements = calls_delta(calls_before, statement_calls(pg, dbname))

    with psycopg.connect(pg.dsn(dbname), autocommit=True) as conn:
        rows = conn.execute(
            "SELECT source_key, status, extract(epoch FROM enqueued_at)::float8, "
            "extract(epoch FROM finished_at)::float8 FROM reactor.move_history WHERE source_bucket = %s",
            (source,),
        ).fetchall()
    by_key = {str(r[0]): (str(r[1]), float(r[2]), None if r[3] is None else float(r[3])) for r in rows}
    not_done = sum(1 for status, _e, _f in by_key.values() if status != "done")
    if not_done:
        result.notes.append(f"{not_done} move(s) not done")
    finished_at = [f for _s, _e, f in by_key.values() if f is not None]
    if uploads and finished_at:
        first = min(u.started for u in uploads)
        result.moves_per_s = len(finished_at) / max(1e-9, max(finished_at) - first)
        done_at = {key: f for key, (_s, _e, f) in by_key.items() if f is not None}
        result.latencies = [done_at[u.key] - u.done for u in uploads if u.key in done_at]
    enqueued = sorted(e for _s, e, _f in by_key.values())
    if len(enqueued) > 1:
        result.extra["ingest_per_s"] = (len(enqueued) - 1) / max(1e-9, enqueued[-1] - enqueued[0])
        result.extra["ingest_lag_s"] = enqueued[-1] - max(u.done for u in uploads)
    if mode.ingestion != "listen":
        p50, mean, count = handler_stats(texts)
        if p50 is not None and mean is not None:
            result.extra["handler_p50_ms"] = p50 * 1000
            result.extra["handler_mean_ms"] = mean * 1000
            result.extra["webhook_posts"] = count
    result.moved, note = check_moved(client, source, target, uploads)
    if note:
        result.notes.append(note)
    return result
