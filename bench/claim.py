"""The claim-path micro benchmark: reactor.outbox.Outbox alone, no S3, no-op moves.

100,000 pending moves over 1,000 keys are bulk-inserted (generate_series) with consistent order_keys
rows (head_seq = the lowest pending seq, ready_at = now()); optionally 1,000,000 finished moves of the
same keys sit below them as history (with one audit event each). Then N threads loop as the poller's
dispatcher does: one round trip (reactor.finish_and_claim) records the moves of the previous cycle as
done and claims up to k more, as fast as they can, for a fixed time.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import psycopg

from bench.common import percentile
from bench.services import fresh_database
from reactor.devstack import PostgresServer, claim_plans, plan_lines
from reactor.domain import MoveStatus
from reactor.outbox import ClaimedMove, Finish, Outbox, make_engine


@dataclass
class ClaimResult:
    history: int
    pending: int
    keys: int
    threads: int
    batch: int
    seconds: float = 0.0
    moves: int = 0
    cycles: int = 0
    empty_claims: int = 0
    errors: int = 0
    cycle_ms: list[float] = field(default_factory=list)
    plan: list[str] = field(default_factory=list)
    load_seconds: float = 0.0

    @property
    def moves_per_s(self) -> float:
        return self.moves / self.seconds if self.seconds else 0.0

    @property
    def calls_per_s(self) -> float:
        return self.cycles / self.seconds if self.seconds else 0.0


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


def explain_claim(dsn: str, limit: int) -> list[str]:
    """The plans the claim statement inside reactor.claim_moves ran with (auto_explain, analyzed,
    rolled back): the first custom plan and the last one (PL/pgSQL's generic plan, if it switched)."""
    plans = claim_plans(dsn, limit=limit, runs=7, analyze=True)
    return ["first run:", *plan_lines(plans[0]), "", "seventh run:", *plan_lines(plans[-1])]


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
        moves = cycles = empty = errors = 0
        cycle_ms: list[float] = []
        held: list[ClaimedMove] = []
        while True:
            last = time.monotonic() >= stop_at
            t0 = time.perf_counter()
            try:
                recorded, claimed = outbox.finish_and_claim(
                    [(move, done) for move in held], limit=0 if last else batch, worker=name, lease_seconds=60
                )
            except Exception:
                errors += 1
                if last:
                    break
                continue
            cycle_ms.append((time.perf_counter() - t0) * 1000)
            cycles += 1
            moves += len(recorded)
            errors += len(held) - len(recorded)
            held = claimed
            if last:
                break
            if not claimed:
                empty += 1
                time.sleep(0.001)
        with lock:
            result.moves += moves
            result.cycles += cycles
            result.empty_claims += empty
            result.errors += errors
            result.cycle_ms += cycle_ms

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
        result.plan = explain_claim(pg.dsn(dbname), batch)
    finally:
        engine.dispose()
        pg.drop_database(dbname)
    return result


def summarize(r: ClaimResult) -> str:
    p50 = percentile(r.cycle_ms, 50) or 0.0
    p99 = percentile(r.cycle_ms, 99) or 0.0
    return (
        f"| {r.history:,} | {r.pending:,} / {r.keys:,} | {r.threads} x {r.batch} | {r.seconds:.1f} | "
        f"{r.moves:,} | {r.moves_per_s:,.0f} | {r.calls_per_s:,.0f} | {p50:.2f} | {p99:.2f} | "
        f"{r.empty_claims} / {r.errors} | {r.load_seconds:.0f} |"
    )


CLAIM_HEADER = (
    "| history rows | pending / keys | threads x batch | seconds | moves claimed+finished | moves/s | "
    "round trips/s | round trip p50 ms | p99 ms | empty claims / errors | load s |\n"
    "|---:|---:|---|---:|---:|---:|---:|---:|---:|---|---:|"
)
