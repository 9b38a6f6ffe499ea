"""The claim-path micro benchmark: reactor.outbox.Outbox alone, no S3, no-op moves.

100,000 pending moves over 1,000 keys are bulk-inserted (generate_series) with consistent order_keys
rows (head_seq = the lowest pending seq, ready_at = now()); optionally 1,000,000 finished moves of the
same keys sit below them as history (with one audit event each). Then N threads loop
claim(limit=k) + finish(done) for each claimed move, as fast as they can, for a fixed time.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import psycopg
from sqlalchemy import text

from bench.common import percentile
from bench.services import fresh_database
from reactor.devstack import PostgresServer
from reactor.domain import MoveStatus
from reactor.outbox import Finish, Outbox, make_engine
from reactor.queries import query


@dataclass
class ClaimResult:
    history: int
    pending: int
    keys: int
    threads: int
    batch: int
    seconds: float = 0.0
    moves: int = 0
    claim_calls: int = 0
    finish_calls: int = 0
    empty_claims: int = 0
    errors: int = 0
    claim_ms: list[float] = field(default_factory=list)
    finish_ms: list[float] = field(default_factory=list)
    plan: list[str] = field(default_factory=list)
    load_seconds: float = 0.0

    @property
    def moves_per_s(self) -> float:
        return self.moves / self.seconds if self.seconds else 0.0

    @property
    def calls_per_s(self) -> float:
        return (self.claim_calls + self.finish_calls) / self.seconds if self.seconds else 0.0


def _load(dsn: str, *, history: int, pending: int, keys: int) -> None:
    h, p = history // keys, pending // keys
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO reactor.order_keys (order_key, last_seq, head_seq, ready_at) "
            "SELECT 'k' || k, %(h)s + %(p)s, %(h)s + 1, now() FROM generate_series(1, %(keys)s) k",
            {"h": h, "p": p, "keys": keys},
        )
        columns = (
            "order_key, seq, rule, via, source_bucket, source_key, etag, size, sequencer, target_bucket, "
            "target_key, status, attempts, enqueued_at, started_at, finished_at, worker"
        )
        if h:
            conn.execute(
                f"INSERT INTO reactor.moves ({columns}) "
                "SELECT 'k' || k, s, 'bench', 'webhook', 'src', 'k' || k || '/' || s, md5(k || '/' || s), "
                "16384, lpad(to_hex(s), 16, '0'), 'dst', 'k' || k || '/' || s, 'done', 1, "
                "now() - interval '1 day', now() - interval '1 day', now() - interval '1 day', 'history' "
                "FROM generate_series(1, %(keys)s) k, generate_series(1, %(h)s) s",
                {"h": h, "keys": keys},
            )
            conn.execute(
                "INSERT INTO reactor.move_events (move_id, kind, worker, detail) "
                "SELECT id, 'done', 'history', '{}'::jsonb FROM reactor.moves"
            )
        conn.execute(
            f"INSERT INTO reactor.moves ({columns}) "
            "SELECT 'k' || k, s, 'bench', 'webhook', 'src', 'k' || k || '/' || s, md5(k || '/' || s), "
            "16384, lpad(to_hex(s), 16, '0'), 'dst', 'k' || k || '/' || s, 'pending', 0, now(), "
            "NULL, NULL, NULL "
            "FROM generate_series(1, %(keys)s) k, generate_series(%(h)s + 1, %(h)s + %(p)s) s",
            {"h": h, "p": p, "keys": keys},
        )
        conn.execute("VACUUM ANALYZE")


def explain_claim(outbox: Outbox, limit: int) -> list[str]:
    """EXPLAIN (ANALYZE, BUFFERS) of the claim statement, in a transaction that is rolled back."""
    with outbox.engine.connect() as conn:
        rows = conn.execute(
            text("EXPLAIN (ANALYZE, BUFFERS, COSTS OFF) " + query("claim_moves").text),
            {"limit": limit, "worker": "explain", "lease_seconds": 60},
        ).all()
        conn.rollback()
    return [str(r[0]) for r in rows]


def run_claim_bench(  # noqa: PLR0915 - setup, timed loop, plan: one sequence
    pg: PostgresServer,
    *,
    dbname: str,
    history: int,
    pending: int = 100_000,
    keys: int = 1000,
    threads: int = 4,
    batch: int = 8,
    seconds: float = 10.0,
) -> ClaimResult:
    result = ClaimResult(history=history, pending=pending, keys=keys, threads=threads, batch=batch)
    url = fresh_database(pg, dbname)
    started = time.monotonic()
    _load(pg.dsn(dbname), history=history, pending=pending, keys=keys)
    result.load_seconds = time.monotonic() - started
    engine = make_engine(url, pool_size=threads + 2)
    outbox = Outbox(engine)
    done = Finish(status=MoveStatus.DONE, kind="done", detail={"attempt": 1, "steps": []})
    lock = threading.Lock()
    stop_at = time.monotonic() + seconds + 0.0

    def worker(n: int) -> None:
        name = f"claim-bench-{n}"
        moves = claims = finishes = empty = errors = 0
        claim_ms: list[float] = []
        finish_ms: list[float] = []
        while time.monotonic() < stop_at:
            t0 = time.perf_counter()
            try:
                claimed = outbox.claim(batch, worker=name, lease_seconds=60)
            except Exception:
                errors += 1
                continue
            claim_ms.append((time.perf_counter() - t0) * 1000)
            claims += 1
            if not claimed:
                empty += 1
                time.sleep(0.001)
                continue
            for move in claimed:
                t1 = time.perf_counter()
                try:
                    outbox.finish(move, done, worker=name)
                except Exception:
                    errors += 1
                    continue
                finish_ms.append((time.perf_counter() - t1) * 1000)
                finishes += 1
                moves += 1
        with lock:
            result.moves += moves
            result.claim_calls += claims
            result.finish_calls += finishes
            result.empty_claims += empty
            result.errors += errors
            result.claim_ms += claim_ms
            result.finish_ms += finish_ms

    try:
        outbox.ping()  # open the pool before the clock starts
        pool = [
            threading.Thread(target=worker, args=(n,), name=f"claim-{n}", daemon=True) for n in range(threads)
        ]
        t_start = time.monotonic()
        stop_at = t_start + seconds
        for thread in pool:
            thread.start()
        for thread in pool:
            thread.join(seconds + 60.0)
        result.seconds = time.monotonic() - t_start
        result.plan = explain_claim(outbox, batch)
    finally:
        engine.dispose()
        pg.drop_database(dbname)
    return result


def summarize(r: ClaimResult) -> str:
    claim_p50 = percentile(r.claim_ms, 50) or 0.0
    finish_p50 = percentile(r.finish_ms, 50) or 0.0
    return (
        f"| {r.history:,} | {r.pending:,} / {r.keys:,} | {r.threads} x claim({r.batch}) | {r.seconds:.1f} | "
        f"{r.moves:,} | {r.moves_per_s:,.0f} | {r.calls_per_s:,.0f} | {claim_p50:.2f} | {finish_p50:.2f} | "
        f"{r.empty_claims} / {r.errors} | {r.load_seconds:.0f} |"
    )


CLAIM_HEADER = (
    "| history rows | pending / keys | threads | seconds | moves claimed+finished | moves/s | "
    "DB calls/s (claim+finish) | claim p50 ms | finish p50 ms | empty claims / errors | load s |\n"
    "|---:|---:|---|---:|---:|---:|---:|---:|---:|---|---:|"
)
