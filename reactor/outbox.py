"""The outbox adapter: runs the named statements against PostgreSQL; no queue logic of its own."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar

from sqlalchemy import Connection, Engine, Row, TextClause, create_engine, text
from sqlalchemy.exc import DBAPIError, OperationalError

from reactor.domain import MoveId, MoveStatus, Upload, Via
from reactor.errors import DatabaseUnavailable
from reactor.queries import query


@dataclass(frozen=True, kw_only=True)
class NewMove:
    """What enqueueing needs: the upload, the rule that matched it and where it goes."""

    upload: Upload
    rule: str
    order_key: str
    target_bucket: str
    target_key: str
    via: Via
    error: str | None = None  # set when the move can never run (unsafe target): recorded failed


@dataclass(frozen=True, kw_only=True)
class Enqueued:
    move_id: MoveId | None  # None: this upload already had a move
    seq: int | None
    is_head: bool = False  # the move is its key's head: runnable now

    @property
    def duplicate(self) -> bool:
        return self.move_id is None


@dataclass(frozen=True, kw_only=True)
class ClaimedMove:
    """A move this worker holds under a lease; everything the mover needs, nothing of SQL."""

    id: MoveId
    order_key: str
    seq: int
    rule: str
    source_bucket: str
    source_key: str
    source_version_id: str
    etag: str
    size: int
    sequencer: str
    target_bucket: str
    target_key: str
    attempts: int
    lease_token: uuid.UUID
    target_etag: str | None
    newer_done: bool


@dataclass(frozen=True, kw_only=True)
class Finish:
    """One attempt's recorded outcome."""

    status: MoveStatus
    kind: str  # the move_events kind: done, superseded, failed, retry_scheduled
    blocking: bool = False
    retry_delay: float = 0.0
    error: str | None = None
    note: str | None = None
    target_etag: str | None = None
    detail: Mapping[str, Any] | None = None


PRUNE_LOCK_ID = 727_002

T = TypeVar("T")


def make_engine(database_url: str, *, pool_size: int = 10) -> Engine:
    """A pooled engine. No pre-ping (a round trip before every checkout): a connection broken by
    a PostgreSQL restart fails its statement, SQLAlchemy then discards the whole pool, and the
    Outbox runs the (repeatable) statement once more on a fresh connection."""
    return create_engine(
        database_url,
        pool_size=pool_size,
        max_overflow=pool_size,
        pool_timeout=10,
        pool_recycle=1800,
        connect_args={"connect_timeout": 5, "application_name": "reactor"},
    )


def _is_unavailable(exc: DBAPIError) -> bool:
    return isinstance(exc, OperationalError) or exc.connection_invalidated


def _unavailable(exc: DBAPIError) -> DatabaseUnavailable:
    return DatabaseUnavailable(f"PostgreSQL is unreachable: {exc.orig or exc}")


def _claimed(r: Row[Any]) -> ClaimedMove:
    return ClaimedMove(
        id=MoveId(r.id),
        order_key=r.order_key,
        seq=r.seq,
        rule=r.rule,
        source_bucket=r.source_bucket,
        source_key=r.source_key,
        source_version_id=r.source_version_id,
        etag=r.etag,
        size=r.size,
        sequencer=r.sequencer,
        target_bucket=r.target_bucket,
        target_key=r.target_key,
        attempts=r.attempts,
        lease_token=r.lease_token,
        target_etag=r.target_etag,
        newer_done=r.newer_done,
    )


def _finish_json(move: ClaimedMove, outcome: Finish) -> dict[str, Any]:
    return {
        "id": move.id,
        "lease_token": str(move.lease_token),
        "status": outcome.status.value,
        "blocking": outcome.blocking,
        "retry_delay": outcome.retry_delay,
        "error": outcome.error,
        "note": outcome.note,
        "target_etag": outcome.target_etag,
        "kind": outcome.kind,
        "detail": dict(outcome.detail or {}),
    }


def _move_json(idx: int, move: NewMove) -> dict[str, Any]:
    up = move.upload
    return {
        "idx": idx,
        "order_key": move.order_key,
        "rule": move.rule,
        "via": move.via,
        "source_bucket": up.bucket,
        "source_key": up.key,
        "source_version_id": up.version_id,
        "etag": up.etag,
        "size": up.size,
        "sequencer": up.sequencer,
        "modified_ms": up.modified_ms,
        "target_bucket": move.target_bucket,
        "target_key": move.target_key,
        "event": dict(up.raw) if up.raw else None,
        "error": move.error,
    }


class Outbox:
    """Enqueue, claim, finish, renew and recover moves.

    Every state change is ONE statement (a PL/pgSQL transition function or a single guarded
    UPDATE) run in autocommit mode: one round trip, its own transaction, no BEGIN/COMMIT
    chatter. Only the hand-made transitions (retry, prune) use explicit transactions.
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._auto = engine.execution_options(isolation_level="AUTOCOMMIT")

    def _rows(
        self, statement: str | TextClause, params: Mapping[str, Any] | None = None
    ) -> Sequence[Row[Any]]:
        """Run one statement (a name from queries.sql, or a clause) in autocommit mode; its rows."""
        stmt = query(statement) if isinstance(statement, str) else statement
        return self._retrying(lambda conn: conn.execute(stmt, params or {}).all(), autocommit=True)

    def _retrying(self, work: Callable[[Connection], T], *, autocommit: bool) -> T:
        """Run `work` on a pooled connection (in autocommit mode, or in one transaction).

        Without a pre-ping, a pooled connection that PostgreSQL closed (a restart since it was last
        used) fails its first statement; SQLAlchemy then discards the whole pool, and the work runs
        once more on a fresh connection. Such a failure happens when the statement is sent, so it
        did not run. (A connection lost in the instant between the server's commit and its answer
        would run it twice: enqueue deduplicates, finishes are fenced by the lease token and then
        reported as fenced, and a repeated claim leaves its first claims to lease recovery.)
        """
        source = self._auto if autocommit else self.engine
        for attempt in (1, 2):
            try:
                with source.connect() as conn:
                    result = work(conn)
                    if not autocommit:
                        conn.commit()
                    return result
            except DBAPIError as exc:
                if exc.connection_invalidated and attempt == 1:
                    continue
                if _is_unavailable(exc):
                    raise _unavailable(exc) from exc
                raise
        raise AssertionError("unreachable")  # pragma: no cover

    def ping(self) -> None:
        self._rows(text("SELECT 1"))

    def enqueue(self, move: NewMove, *, worker: str) -> Enqueued:
        """Record the move; a duplicate of an already recorded upload returns move_id None."""
        return self.enqueue_many([move], worker=worker)[0]

    def enqueue_many(self, moves: Sequence[NewMove], *, worker: str) -> list[Enqueued]:
        """Record a batch of moves in one round trip and one transaction; results in input order
        (move_id None for a duplicate). Either all of them are committed, or none."""
        if not moves:
            return []
        payload = json.dumps([_move_json(i, m) for i, m in enumerate(moves)])
        rows = self._rows("enqueue_moves", {"moves": payload, "worker": worker})
        results = [Enqueued(move_id=None, seq=None)] * len(moves)
        for r in rows:
            results[r.idx] = Enqueued(move_id=MoveId(r.id), seq=r.seq, is_head=bool(r.is_head))
        return results

    def claim(self, limit: int, *, worker: str, lease_seconds: float) -> list[ClaimedMove]:
        rows = self._rows("claim_moves", {"limit": limit, "worker": worker, "lease_seconds": lease_seconds})
        return [_claimed(r) for r in rows]

    def finish_and_claim(
        self,
        finished: Sequence[tuple[ClaimedMove, Finish]],
        *,
        limit: int,
        worker: str,
        lease_seconds: float,
    ) -> tuple[set[MoveId], list[ClaimedMove]]:
        """Record the outcomes, then claim up to `limit` moves, in one round trip.

        Returns the ids whose outcome was recorded (a missing one was fenced: this worker's lease
        was taken over, nothing changed) and the moves claimed."""
        payload = json.dumps([_finish_json(move, outcome) for move, outcome in finished])
        rows = self._rows(
            "finish_and_claim",
            {"finishes": payload, "worker": worker, "limit": limit, "lease_seconds": lease_seconds},
        )
        recorded = {MoveId(r.finished_id) for r in rows if r.finished_id is not None}
        return recorded, [_claimed(r) for r in rows if r.finished_id is None]

    def finish(self, move: ClaimedMove, outcome: Finish, *, worker: str) -> bool:
        """Record the outcome; False when this worker's lease was taken over (nothing changed)."""
        recorded, _ = self.finish_and_claim([(move, outcome)], limit=0, worker=worker, lease_seconds=0)
        return move.id in recorded

    def checkpoint(self, move: ClaimedMove, target_etag: str) -> bool:
        """Record the proven target ETag; False when this worker no longer holds the move."""
        rows = self._rows(
            "checkpoint_move",
            {"move_id": move.id, "lease_token": move.lease_token, "target_etag": target_etag},
        )
        return bool(rows)

    def renew(self, leases: Mapping[MoveId, uuid.UUID], *, lease_seconds: float) -> set[MoveId]:
        """Extend the given leases; the ids returned are the ones still held."""
        if not leases:
            return set()
        ids = list(leases)
        rows = self._rows(
            "renew_leases",
            {"move_ids": ids, "lease_tokens": [leases[i] for i in ids], "lease_seconds": lease_seconds},
        )
        return {MoveId(r.id) for r in rows}

    def recover_expired(self, *, worker: str, max_attempts: int, block: bool) -> int:
        rows = self._rows("recover_expired", {"worker": worker, "max_attempts": max_attempts, "block": block})
        return int(rows[0].recovered)

    def retry(self, move_ids: Sequence[int], *, worker: str) -> list[MoveId]:
        """Put failed moves back to pending, each in its key's lock order; returns those retried."""

        def retry_one(conn: Connection, move_id: int) -> MoveId | None:
            key = conn.execute(
                text("SELECT order_key FROM reactor.moves WHERE id = :id"), {"id": move_id}
            ).scalar_one_or_none()
            if key is None:
                return None
            conn.execute(query("lock_key"), {"order_key": key})
            row = conn.execute(query("retry_move"), {"move_id": move_id, "worker": worker}).first()
            if row is None:
                return None
            conn.execute(query("refresh_key"), {"order_key": key})
            return MoveId(row.id)

        retried: list[MoveId] = []
        for move_id in move_ids:
            done = self._retrying(partial(retry_one, move_id=move_id), autocommit=False)
            if done is not None:
                retried.append(done)
        if retried:
            self._rows(text("SELECT pg_notify('reactor_moves', '')"))
        return retried

    def prune(self, *, older_than_days: float, batch: int = 1000) -> int | None:
        """Delete finished moves older than the given age, batch by batch; None when another
        instance is pruning right now (one at a time, by an advisory lock)."""
        total = 0
        params = {"older_than_seconds": older_than_days * 86400.0, "batch": batch}
        try:
            with self._auto.connect() as lock_conn:
                got = lock_conn.execute(
                    text("SELECT pg_try_advisory_lock(:id)"), {"id": PRUNE_LOCK_ID}
                ).scalar_one()
                if not got:
                    return None
                try:
                    while True:
                        deleted = len(self._rows("prune_finished", params))
                        total += deleted
                        if deleted < batch:
                            return total
                finally:
                    lock_conn.execute(text("SELECT pg_advisory_unlock(:id)"), {"id": PRUNE_LOCK_ID})
        except DBAPIError as exc:
            if _is_unavailable(exc):
                raise _unavailable(exc) from exc
            raise

    def queue_gauges(self) -> dict[str, float]:
        row = self._rows("queue_gauges")[0]
        return {
            "pending": float(row.pending),
            "running": float(row.running),
            "blocked": float(row.blocked),
            "oldest_pending_seconds": float(row.oldest_pending_seconds),
        }

    def failed_move_ids(self) -> list[int]:
        rows = self._rows(text("SELECT id FROM reactor.moves WHERE status = 'failed' ORDER BY id"))
        return [int(r.id) for r in rows]
