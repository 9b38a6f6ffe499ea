"""Claims moves and runs them: up to REACTOR_CONCURRENCY at once, across different order keys.

Wake-ups come from LISTEN/NOTIFY (an enqueue that creates a runnable head), from a finished
move (its key's next move may be ready), and from an APScheduler interval job as the fallback
(and for retries whose backoff ran out). Heartbeats renew this worker's leases; a recovery job
gives the moves of dead workers back to the queue.

No database transaction is held open while S3 works: a copy can take minutes, and an open
transaction would pin a pooled connection, hold row locks that block enqueues of the same key,
and hold back vacuum. Instead a claim is a lease (a row state plus a token, committed at once),
renewed by heartbeats, and the finish is fenced by the token.
"""

from __future__ import annotations

import random
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import psycopg

from reactor import decision, logs, metrics
from reactor.domain import MoveId, MoveStatus, OnConflict
from reactor.errors import DatabaseUnavailable, LeaseLost, ObjectStoreUnavailable
from reactor.mover import MoveOrder, Mover, MoveResult
from reactor.outbox import ClaimedMove, Finish, Outbox

log = logs.get("reactor.poller")

NOTIFY_CHANNEL = "reactor_moves"


@dataclass(frozen=True, kw_only=True)
class PollerConfig:
    worker: str
    concurrency: int
    lease_seconds: float
    max_attempts: int
    block_on_failure: bool
    retry_base_delay: float
    retry_max_delay: float


class _LeaseHooks:
    """Stops a move whose lease was lost before it changes S3 again, and records checkpoints.

    A lease counts as lost when a heartbeat found it taken over, and also when no heartbeat has
    renewed it for two thirds of its length: a worker cut off from PostgreSQL cannot know whether
    another instance took the move, so it stops before its lease can run out mid-step.
    """

    def __init__(self, poller: Poller, move: ClaimedMove) -> None:
        self.poller = poller
        self.move = move

    def before_step(self, step: str) -> None:
        if not self.poller.holds(self.move):
            raise LeaseLost(f"move {self.move.id}: lease taken over or not renewed before {step}")
        self.poller.step_hook(self.move, step)

    def checkpoint(self, target_etag: str) -> None:
        if not self.poller.outbox.checkpoint(self.move, target_etag):
            raise LeaseLost(f"move {self.move.id}: lease taken over before the checkpoint")


@dataclass(frozen=True)
class _Done:
    """A move whose attempt ended, waiting for the dispatcher to record its outcome."""

    move: ClaimedMove
    outcome: Finish
    started: float
    ended: float
    ctx: dict[str, Any]


class Poller:
    """Runs moves on a thread pool; ONE dispatcher thread talks to the outbox for them.

    The dispatcher's cycle is a single round trip (reactor.finish_and_claim): it records every
    attempt that ended since the last cycle and claims as many moves as there are free slots. A
    move finishing is therefore recorded and its key's next move claimed in the same statement,
    and under load the finishes batch themselves (those that end while a cycle is in flight go
    into the next one) without any timer adding latency.
    """

    def __init__(
        self,
        *,
        outbox: Outbox,
        mover: Mover,
        config: PollerConfig,
        on_conflict: Callable[[str], OnConflict],
        store_alive: Callable[[], bool] = lambda: True,
    ) -> None:
        self.outbox = outbox
        self.mover = mover
        self.config = config
        self.on_conflict = on_conflict
        # Circuit breaker for MinIO outages: after a move fails because MinIO cannot be reached,
        # stop claiming (each claim would burn an attempt) until a cheap probe answers again.
        self.store_alive = store_alive
        self._store_down = False
        self._next_probe = 0.0
        self._probe_delay = 0.5
        self.executor = ThreadPoolExecutor(max_workers=config.concurrency, thread_name_prefix="move")
        self.in_flight: dict[MoveId, ClaimedMove] = {}
        # Keyed by lease token, not move id: the same move may be claimed again by this worker
        # after a lease expired, and the two runs must not be confused.
        self.lost: set[uuid.UUID] = set()
        self.renewed_at: dict[uuid.UUID, float] = {}
        self._done: list[_Done] = []
        self._state = threading.Lock()
        self._kick = threading.Event()
        self._stopping = threading.Event()  # no more claims; finishes are still recorded
        self._halted = threading.Event()  # the dispatcher exits
        self._dispatcher: threading.Thread | None = None
        # Tests replace this to inject a fault at an exact step (see tests/chaos).
        self.step_hook: Callable[[ClaimedMove, str], None] = lambda _move, _step: None

    # -- dispatching --------------------------------------------------------------------------

    def wake(self) -> None:
        """Ask the dispatcher for a cycle (claim whatever is runnable); cheap, from any thread."""
        if self._dispatcher is None:
            with self._state:
                if self._dispatcher is None and not self._halted.is_set():
                    self._dispatcher = threading.Thread(target=self._dispatch, name="dispatcher", daemon=True)
                    self._dispatcher.start()
        self._kick.set()

    def _dispatch(self) -> None:
        delay = 0.2
        while not self._halted.is_set():
            self._kick.wait()
            if self._halted.is_set():
                return
            self._kick.clear()
            try:
                ok = self._cycle()
            except Exception:  # a bug must not end claiming for good; the next kick tries again
                log.exception("dispatch_failed")
                ok = False
            if ok:
                delay = 0.2
            else:  # PostgreSQL trouble: back off, then try again with whatever ended meanwhile
                self._halted.wait(delay)
                delay = min(delay * 2, 2.0)
                self._kick.set()

    def _cycle(self) -> bool:
        """One round trip: record what ended, claim into the free slots. False on failure."""
        with self._state:
            done, self._done = self._done, []
            free = self.config.concurrency - len(self.in_flight) + len(done)
            store_down = self._store_down
        # While MinIO is down, a cycle with finishes to record does not wait for a probe first;
        # the next cycle (a poll) probes.
        may_claim = free > 0 and not self._stopping.is_set() and not (done and store_down)
        limit = free if may_claim and self._store_ready() else 0
        if not done and limit == 0:
            return True
        try:
            recorded, claimed = self.outbox.finish_and_claim(
                [(d.move, d.outcome) for d in done],
                limit=limit,
                worker=self.config.worker,
                lease_seconds=self.config.lease_seconds,
            )
        except DatabaseUnavailable as exc:  # the lease covers the moves meanwhile; see _requeue
            stage = "finish" if done else "claim"
            metrics.ERRORS.labels("postgres", stage).inc()
            log.warning(f"{stage}_failed", error=str(exc), finishes=len(done))
            self._requeue(done, str(exc))
            return False
        except Exception as exc:  # not an outage: do not let one outcome hold up the others
            metrics.ERRORS.labels("postgres", "finish" if done else "claim").inc()
            log.exception("finish_and_claim_failed", finishes=len(done))
            self._record_one_by_one(done, str(exc))
            return True
        for d in done:
            self._report(d, recorded=d.move.id in recorded)
            self._forget(d.move)
        self._start(claimed)
        if limit and len(claimed) == limit:
            self._kick.set()  # there may be more; claim again once slots free up
        return True

    def _record_one_by_one(self, done: list[_Done], error: str) -> None:
        """After a batch failed for a reason other than an outage: each outcome on its own, so a
        bad one (logged, left to lease recovery) does not keep the others unrecorded."""
        for d in done:
            try:
                recorded = self.outbox.finish(d.move, d.outcome, worker=self.config.worker)
            except DatabaseUnavailable as exc:
                self._requeue([d], str(exc))
                continue
            except Exception as exc:
                log.error("finish_unrecorded", move_id=d.move.id, error=f"{error}; alone: {exc}")
                self._forget(d.move)
                continue
            self._report(d, recorded=recorded)
            self._forget(d.move)

    def _requeue(self, done: list[_Done], error: str) -> None:
        """Keep unrecorded outcomes for the next cycle while their lease could still be ours; past
        that, another worker will redo the move (every step is idempotent)."""
        keep: list[_Done] = []
        now = time.monotonic()
        for d in done:
            if now - d.ended < self.config.lease_seconds:
                keep.append(d)
                continue
            metrics.ERRORS.labels("postgres", "finish_unrecorded").inc()
            log.error("finish_unrecorded", move_id=d.move.id, error=error)
            self._forget(d.move)
        with self._state:
            self._done[:0] = keep

    def _start(self, claimed: list[ClaimedMove]) -> None:
        now = time.monotonic()
        with self._state:
            for move in claimed:
                self.in_flight[move.id] = move
                self.renewed_at[move.lease_token] = now
        for move in claimed:
            try:
                self.executor.submit(self._run, move)
            except RuntimeError:  # shutting down: the lease expires and another instance runs it
                self._forget(move)

    def _store_unavailable(self) -> None:
        with self._state:
            if self._store_down:
                return
            self._store_down = True
            self._probe_delay = 0.5
            self._next_probe = time.monotonic() + self._probe_delay
        log.warning("minio_unavailable_pausing_claims")

    def _store_ready(self) -> bool:
        """False while MinIO is known to be down; probes it at most every few seconds."""
        with self._state:
            if not self._store_down:
                return True
            if time.monotonic() < self._next_probe:
                return False
        alive = False
        try:
            alive = self.store_alive()
        except Exception:  # a failing probe is a 'no'
            alive = False
        with self._state:
            if alive:
                self._store_down = False
            else:
                self._probe_delay = min(self._probe_delay * 2, 5.0)
                self._next_probe = time.monotonic() + self._probe_delay
        if alive:
            log.warning("minio_available_resuming_claims")
        return alive

    # -- running ------------------------------------------------------------------------------

    def _order(self, move: ClaimedMove) -> MoveOrder:
        return MoveOrder(
            source_bucket=move.source_bucket,
            source_key=move.source_key,
            version_id=move.source_version_id,
            etag=move.etag,
            size=move.size,
            target_bucket=move.target_bucket,
            target_key=move.target_key,
            on_conflict=self.on_conflict(move.rule),
            checkpoint_etag=move.target_etag,
            newer_version_moved=move.newer_done,
        )

    def holds(self, move: ClaimedMove) -> bool:
        """Whether this worker may still act on the move (see _LeaseHooks)."""
        with self._state:
            if move.lease_token in self.lost:
                return False
            renewed = self.renewed_at.get(move.lease_token)
        return renewed is not None and time.monotonic() - renewed < self.config.lease_seconds * 2 / 3

    def _forget(self, move: ClaimedMove) -> None:
        with self._state:
            if self.in_flight.get(move.id) is move:
                del self.in_flight[move.id]
            self.lost.discard(move.lease_token)
            self.renewed_at.pop(move.lease_token, None)

    def _run(self, move: ClaimedMove) -> None:
        """A pool thread: run the move, hand its outcome to the dispatcher (which records it)."""
        done: _Done | None = None
        try:
            done = self._run_move(move)
        except Exception:  # never lose a worker thread silently; the lease recovers the move
            log.exception("move_crashed", move_id=move.id, order_key=move.order_key, seq=move.seq)
        if done is None:
            self._forget(move)
        else:
            with self._state:
                self._done.append(done)
        self.wake()

    def _run_move(self, move: ClaimedMove) -> _Done | None:
        ctx: dict[str, Any] = {
            "move_id": move.id,
            "order_key": move.order_key,
            "seq": move.seq,
            "source": f"{move.source_bucket}/{move.source_key}",
            "target": f"{move.target_bucket}/{move.target_key}",
            "attempt": move.attempts,
        }
        started = time.monotonic()
        try:
            result = self.mover.execute(self._order(move), _LeaseHooks(self, move))
        except LeaseLost as exc:
            log.warning("lease_lost", **ctx, error=str(exc))
            return None
        except Exception as exc:  # any S3 or network error: this attempt failed, retry later
            metrics.ERRORS.labels("minio", "move").inc()
            if isinstance(exc, ObjectStoreUnavailable):
                self._store_unavailable()
            result = MoveResult(status=MoveStatus.FAILED, error=f"{type(exc).__name__}: {exc}")
        outcome = self._outcome(move, result)
        self.step_hook(move, "finish")
        return _Done(move=move, outcome=outcome, started=started, ended=time.monotonic(), ctx=ctx)

    def _report(self, d: _Done, *, recorded: bool) -> None:
        outcome = d.outcome
        if recorded:
            metrics.MOVE_DURATION.labels(d.move.rule, outcome.status.value).observe(
                time.monotonic() - d.started
            )
            if outcome.status is MoveStatus.PENDING:
                metrics.MOVE_RETRIES.labels(d.move.rule).inc()
            else:
                metrics.MOVES_FINISHED.labels(d.move.rule, outcome.status.value).inc()
        fields = {**d.ctx, "status": outcome.status.value, "seconds": round(d.ended - d.started, 4)}
        if outcome.note:
            fields["note"] = outcome.note
        if outcome.error:
            fields["error"] = outcome.error
        if not recorded:
            log.warning("finish_fenced", **fields)
        elif outcome.status is MoveStatus.DONE or outcome.status is MoveStatus.SUPERSEDED:
            log.info("move_" + outcome.status.value, **fields)
        else:
            log.warning("move_" + outcome.kind, **fields)

    def _outcome(self, move: ClaimedMove, result: MoveResult) -> Finish:
        detail = {"attempt": move.attempts, "steps": list(result.steps)}
        if result.status is not MoveStatus.FAILED:
            return Finish(
                status=result.status,
                kind=result.status.value,
                note=result.note,
                target_etag=result.target_etag,
                detail=detail,
            )
        after = decision.after_error(
            attempts=move.attempts,
            max_attempts=self.config.max_attempts,
            permanent=result.permanent,
            block_on_failure=self.config.block_on_failure,
            delay=decision.backoff(
                move.attempts,
                base=self.config.retry_base_delay,
                cap=self.config.retry_max_delay,
                jitter=random.random(),  # noqa: S311 - spreading retries, not security
            ),
        )
        kind = "retry_scheduled" if after.status is MoveStatus.PENDING else "failed"
        return Finish(
            status=after.status,
            kind=kind,
            blocking=after.blocking,
            retry_delay=after.retry_delay,
            error=result.error,
            detail={**detail, "error": result.error, "retry_in": round(after.retry_delay, 3)},
        )

    # -- leases -------------------------------------------------------------------------------

    def heartbeat(self) -> None:
        with self._state:
            held = {move_id: move.lease_token for move_id, move in self.in_flight.items()}
        if not held:
            return
        asked = time.monotonic()
        try:
            renewed = self.outbox.renew(held, lease_seconds=self.config.lease_seconds)
        except Exception as exc:  # unrenewed leases age out locally (see holds())
            metrics.ERRORS.labels("postgres", "heartbeat").inc()
            log.warning("heartbeat_failed", error=str(exc))
            return
        lost = {held[move_id] for move_id in set(held) - renewed}
        with self._state:
            for move_id in renewed:
                token = held[move_id]
                if token in self.renewed_at:
                    self.renewed_at[token] = asked
            self.lost |= lost & set(self.renewed_at)
        if lost:
            log.warning("leases_lost", move_ids=sorted(set(held) - renewed))

    def recover(self) -> None:
        try:
            n = self.outbox.recover_expired(
                worker=self.config.worker,
                max_attempts=self.config.max_attempts,
                block=self.config.block_on_failure,
            )
        except Exception as exc:
            metrics.ERRORS.labels("postgres", "recover").inc()
            log.warning("recover_failed", error=str(exc))
            return
        if n:
            log.warning("leases_recovered", moves=n)
            self.wake()

    # -- lifecycle ----------------------------------------------------------------------------

    def busy(self) -> int:
        with self._state:
            return len(self.in_flight)

    def stop_claiming(self) -> None:
        self._stopping.set()

    def stop(self, timeout: float) -> None:
        """Stop claiming; let running moves finish and be recorded (bounded), so their leases
        need not expire. Heartbeats must keep running meanwhile: the caller stops them after."""
        self._stopping.set()
        self._kick.set()
        deadline = time.monotonic() + timeout
        while self.busy() and time.monotonic() < deadline:
            time.sleep(0.05)
        self.executor.shutdown(wait=False, cancel_futures=True)
        self._halted.set()
        self._kick.set()
        dispatcher = self._dispatcher
        if dispatcher is not None and dispatcher is not threading.current_thread():
            dispatcher.join(5.0)


class NotifyListener(threading.Thread):
    """LISTEN on the wake-up channel and call wake(); reconnects with backoff after any error."""

    def __init__(self, conninfo: str, wake: Callable[[], None]) -> None:
        super().__init__(name="notify-listener", daemon=True)
        self.conninfo = conninfo
        self._wake = wake
        self._stop = threading.Event()

    def stop(self) -> None:
        self._stop.set()

    def run(self) -> None:
        delay = 0.5
        while not self._stop.is_set():
            try:
                with psycopg.connect(self.conninfo, autocommit=True, connect_timeout=5) as conn:
                    conn.execute(f"LISTEN {NOTIFY_CHANNEL}")
                    delay = 0.5
                    self._wake()  # whatever was enqueued while we were not listening
                    while not self._stop.is_set():
                        if any(True for _ in conn.notifies(timeout=1.0, stop_after=1)):
                            # Drain the burst, then claim once for all of it.
                            for _ in conn.notifies(timeout=0.0):
                                pass
                            self._wake()
            except Exception as exc:  # the listener must outlive any database trouble
                log.warning("notify_listener_reconnecting", error=str(exc), retry_in=delay)
                self._stop.wait(delay)
                delay = min(delay * 2, 10.0)
