"""The outbox's guarantees, held by the real PostgreSQL: gap-free order, one running move per key,
fencing, backoff, the block policy and an index-backed claim."""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import psycopg
import pytest
from sqlalchemy import Engine, RowMapping, text
from sqlalchemy.exc import DBAPIError, IntegrityError

from reactor.devstack import claim_plans
from reactor.domain import MoveStatus, Upload
from reactor.outbox import ClaimedMove, Enqueued, Finish, NewMove, Outbox, make_engine
from tests.support.e2e import conninfo

WORKER = "test-worker"
LEASE = 30.0
DONE = Finish(status=MoveStatus.DONE, kind="done")


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    """A pooled engine on this test's fresh database, big enough for the concurrent tests."""
    engine = make_engine(database_url, pool_size=20)
    yield engine
    engine.dispose()


@pytest.fixture
def outbox(engine: Engine) -> Outbox:
    return Outbox(engine)


_uploads = itertools.count(1)


def upload(
    key: str | None = None,
    *,
    bucket: str = "src",
    etag: str = "e0",
    version_id: str = "",
    sequencer: str = "",
) -> Upload:
    """An upload; without a key, one no other call of this session named."""
    return Upload(
        bucket=bucket,
        key=key if key is not None else f"obj-{next(_uploads)}",
        etag=etag,
        size=3,
        version_id=version_id,
        sequencer=sequencer,
    )


def new_move(up: Upload, order_key: str, *, error: str | None = None) -> NewMove:
    return NewMove(
        upload=up,
        rule="r",
        order_key=order_key,
        target_bucket="dst",
        target_key=f"moved/{up.key}",
        via="webhook",
        error=error,
    )


def enqueue(outbox: Outbox, order_key: str, up: Upload | None = None) -> Enqueued:
    """Enqueue a fresh upload (or `up`) for `order_key`; fails the test on a duplicate."""
    result = outbox.enqueue(new_move(up or upload(), order_key), worker=WORKER)
    assert result.move_id is not None, "expected a new move, got a duplicate"
    return result


def claim(outbox: Outbox, *, worker: str = WORKER, lease_seconds: float = LEASE) -> list[ClaimedMove]:
    return outbox.claim(10, worker=worker, lease_seconds=lease_seconds)


def heads(claimed: list[ClaimedMove]) -> set[tuple[str, int]]:
    return {(m.order_key, m.seq) for m in claimed}


def move_row(engine: Engine, move_id: int) -> RowMapping:
    with engine.connect() as conn:
        return (
            conn.execute(text("SELECT * FROM reactor.moves WHERE id = :id"), {"id": move_id}).mappings().one()
        )


def events(engine: Engine, move_id: int) -> list[tuple[str, str | None]]:
    with engine.connect() as conn:
        rows = conn.execute(
            text("SELECT kind, worker FROM reactor.move_events WHERE move_id = :id ORDER BY id"),
            {"id": move_id},
        ).all()
    return [(r.kind, r.worker) for r in rows]


# --------------------------------------------------------------------------------------------------
# Enqueue: sequence and identity


def test_concurrent_enqueues_of_one_key_number_it_gap_free_and_drop_duplicates(
    outbox: Outbox, engine: Engine
) -> None:
    # Given 16 threads with 25 distinct uploads each, all for the same order key, and each thread
    # also re-sending its neighbour's uploads (a duplicate notification racing the original)
    threads, per_thread = 16, 25
    own = [[upload(f"t{t}/u{i}") for i in range(per_thread)] for t in range(threads)]
    start = threading.Barrier(threads, timeout=30)

    def work(t: int) -> list[tuple[Upload, Enqueued]]:
        start.wait()
        neighbour = own[(t + 1) % threads]
        results = []
        for mine, theirs in zip(own[t], neighbour, strict=True):
            results.append((mine, outbox.enqueue(new_move(mine, "K"), worker=f"w{t}")))
            results.append((theirs, outbox.enqueue(new_move(theirs, "K"), worker=f"w{t}")))
        return results

    # When they all enqueue at once
    with ThreadPoolExecutor(max_workers=threads) as pool:
        results = [r for batch in pool.map(work, range(threads)) for r in batch]

    # Then every upload got exactly one move, the other attempt returned "duplicate"
    assert len(results) == 2 * threads * per_thread
    new = [res for _, res in results if not res.duplicate]
    duplicates = [res for _, res in results if res.duplicate]
    assert len(new) == 400
    assert len(duplicates) == 400
    assert all(d.move_id is None and d.seq is None for d in duplicates)
    per_upload: dict[str, int] = {}
    for up, res in results:
        per_upload[up.key] = per_upload.get(up.key, 0) + (0 if res.duplicate else 1)
    assert set(per_upload.values()) == {1}
    assert len(per_upload) == 400
    # ... numbered 1..400 without gap or repeat, in the results and in the table
    assert sorted(res.seq for res in new if res.seq is not None) == list(range(1, 401))
    with engine.connect() as conn:
        seqs = conn.execute(
            text("SELECT seq FROM reactor.moves WHERE order_key = 'K' ORDER BY seq")
        ).scalars()
        assert list(seqs) == list(range(1, 401))
        assert conn.execute(text("SELECT count(*) FROM reactor.moves")).scalar_one() == 400
        key = conn.execute(
            text("SELECT last_seq, head_seq FROM reactor.order_keys WHERE order_key = 'K'")
        ).one()
    assert (key.last_seq, key.head_seq) == (400, 1)


def test_an_upload_is_identified_by_bucket_key_version_etag_and_its_time(
    outbox: Outbox, engine: Engine
) -> None:
    # Given a recorded upload (sequencer: its modification time in nanoseconds, as hex)
    ns = 0x18EE19B2641E8EA7
    base = upload("photo.jpg", etag="aaa", version_id="v1", sequencer=f"{ns:016X}")
    first = outbox.enqueue(new_move(base, "K"), worker=WORKER)

    # When the same upload is notified again, also as a listing sees it (time to the millisecond
    # only), and then uploads differing in one identity field each
    again = outbox.enqueue(new_move(base, "K"), worker=WORKER)
    listed = outbox.enqueue(
        new_move(
            upload("photo.jpg", etag="aaa", version_id="v1", sequencer=f"{ns // 10**6 * 10**6:016X}"), "K"
        ),
        worker=WORKER,
    )
    other_time = outbox.enqueue(
        new_move(upload("photo.jpg", etag="aaa", version_id="v1", sequencer=f"{ns + 10**6:016X}"), "K"),
        worker=WORKER,
    )
    other_etag = outbox.enqueue(
        new_move(upload("photo.jpg", etag="bbb", version_id="v1", sequencer=f"{ns:016X}"), "K"),
        worker=WORKER,
    )
    other_version = outbox.enqueue(
        new_move(upload("photo.jpg", etag="aaa", version_id="v2", sequencer=f"{ns:016X}"), "K"),
        worker=WORKER,
    )

    # Then the repeats are duplicates and each difference is a move of its own, next in the key
    assert first.seq == 1
    assert first.move_id is not None
    assert again == Enqueued(move_id=None, seq=None)
    assert listed == Enqueued(move_id=None, seq=None)
    assert [other_time.seq, other_etag.seq, other_version.seq] == [2, 3, 4]
    assert None not in {other_time.move_id, other_etag.move_id, other_version.move_id}
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM reactor.moves")).scalar_one() == 4
        assert conn.execute(text("SELECT last_seq FROM reactor.order_keys")).scalar_one() == 4


# --------------------------------------------------------------------------------------------------
# Claim: order and one running move per key


def test_claim_takes_only_each_keys_head_and_the_next_after_it_finishes(outbox: Outbox) -> None:
    # Given three pending moves of key A and two of key B
    a = [enqueue(outbox, "A") for _ in range(3)]
    b = [enqueue(outbox, "B") for _ in range(2)]

    # When a worker claims up to ten
    first = claim(outbox)

    # Then it gets one move per key: the heads, seq 1 of each
    assert heads(first) == {("A", 1), ("B", 1)}
    assert {m.id for m in first} == {a[0].move_id, b[0].move_id}
    assert all(m.attempts == 1 for m in first)

    # And while those run, nothing else is claimable
    assert claim(outbox) == []

    # When A's head finishes done
    a1 = next(m for m in first if m.order_key == "A")
    assert outbox.finish(a1, DONE, worker=WORKER) is True

    # Then the next claim returns A's second move only (B's head still runs)
    after = claim(outbox)
    assert heads(after) == {("A", 2)}
    assert after[0].id == a[1].move_id


def test_concurrent_claimers_never_take_the_same_key(outbox: Outbox) -> None:
    # Given 60 keys with two pending moves each
    for k in range(60):
        enqueue(outbox, f"k{k}")
        enqueue(outbox, f"k{k}")
    start = threading.Barrier(8, timeout=30)

    def claimer(n: int) -> list[ClaimedMove]:
        start.wait()
        return claim(outbox, worker=f"w{n}")

    # When eight workers claim up to ten each at the same moment
    with ThreadPoolExecutor(max_workers=8) as pool:
        claimed = [m for batch in pool.map(claimer, range(8)) for m in batch]

    # Then no key was claimed twice, only heads were taken, and a last claim finds exactly the rest
    rest = outbox.claim(60, worker="w-last", lease_seconds=LEASE)
    keys = [m.order_key for m in claimed + rest]
    assert len(claimed) >= 10
    assert sorted(keys) == sorted(f"k{k}" for k in range(60))
    assert {m.seq for m in claimed + rest} == {1}


def test_a_claim_flags_an_upload_older_than_one_already_moved(outbox: Outbox) -> None:
    # Given two versions of one object whose notifications arrived out of order (newer first)
    newer = enqueue(outbox, "K", upload("photo.jpg", etag="new", sequencer="00000000000000B2"))
    older = enqueue(outbox, "K", upload("photo.jpg", etag="old", sequencer="00000000000000A1"))

    # When the newer one is moved and then the older one is claimed
    (first,) = claim(outbox)
    assert (first.id, first.newer_done) == (newer.move_id, False)
    assert outbox.finish(first, DONE, worker=WORKER) is True
    (second,) = claim(outbox)

    # Then the claim says a newer version was already moved, so the worker must not copy it over
    assert (second.id, second.newer_done) == (older.move_id, True)


def test_the_database_refuses_a_second_running_move_of_a_key(outbox: Outbox, engine: Engine) -> None:
    # Given key A's head claimed (running) and a second move of A pending
    enqueue(outbox, "A")
    second = enqueue(outbox, "A")
    assert heads(claim(outbox)) == {("A", 1)}

    # When anything (here a raw UPDATE, bypassing the claim query) sets the second one running
    with pytest.raises(IntegrityError) as refused, engine.begin() as conn:
        conn.execute(
            text(
                "UPDATE reactor.moves SET status = 'running', lease_token = gen_random_uuid() WHERE id = :id"
            ),
            {"id": second.move_id},
        )

    # Then the partial unique index refuses it
    orig = refused.value.orig
    assert isinstance(orig, psycopg.errors.UniqueViolation)
    assert orig.diag.constraint_name == "uq_moves_running_order_key"
    assert second.move_id is not None
    assert move_row(engine, second.move_id)["status"] == "pending"


# --------------------------------------------------------------------------------------------------
# Finish: backoff and the block policy


def test_a_retry_waits_out_its_delay_and_holds_back_the_rest_of_its_key(
    outbox: Outbox, engine: Engine
) -> None:
    # Given key A with two moves, its head claimed
    first = enqueue(outbox, "A")
    enqueue(outbox, "A")
    (claimed,) = claim(outbox)
    assert (claimed.id, claimed.attempts) == (first.move_id, 1)

    # When the attempt fails transiently and is scheduled again in 0.5 s
    retry = Finish(status=MoveStatus.PENDING, kind="retry_scheduled", retry_delay=0.5, error="x")
    assert outbox.finish(claimed, retry, worker=WORKER) is True

    # Then neither it nor the key's later move is claimable right away
    assert claim(outbox) == []
    row = move_row(engine, claimed.id)
    assert (row["status"], row["last_error"], row["lease_token"], row["finished_at"]) == (
        "pending",
        "x",
        None,
        None,
    )

    # And after the delay the same move is claimed again, its attempts counted up
    time.sleep(0.6)
    (again,) = claim(outbox)
    assert (again.id, again.seq, again.attempts) == (claimed.id, 1, 2)
    assert again.lease_token != claimed.lease_token
    assert [kind for kind, _ in events(engine, claimed.id)] == [
        "enqueued",
        "claimed",
        "retry_scheduled",
        "claimed",
    ]


def test_a_blocking_failure_holds_its_key_until_retried_by_hand(outbox: Outbox, engine: Engine) -> None:
    # Given key A with two moves, its head claimed
    enqueue(outbox, "A")
    enqueue(outbox, "A")
    (a1,) = claim(outbox)

    # When the head fails for good under the block policy
    failed = Finish(status=MoveStatus.FAILED, blocking=True, kind="failed", error="target refused")
    assert outbox.finish(a1, failed, worker=WORKER) is True

    # Then the key's later move is not claimed: the key's head stays the failed move, never ready
    assert claim(outbox) == []
    with engine.connect() as conn:
        key = conn.execute(
            text("SELECT head_seq, ready_at FROM reactor.order_keys WHERE order_key = 'A'")
        ).one()
    assert (key.head_seq, key.ready_at) == (1, None)
    row = move_row(engine, a1.id)
    assert (row["status"], row["blocking"], row["last_error"]) == ("failed", True, "target refused")
    assert outbox.failed_move_ids() == [a1.id]

    # When an operator retries the failed move
    assert outbox.retry([a1.id], worker="operator") == [a1.id]

    # Then it is pending again and claimable (attempts start over), and the key flows on once it is done
    row = move_row(engine, a1.id)
    assert (row["status"], row["blocking"], row["finished_at"]) == ("pending", False, None)
    (again,) = claim(outbox)
    assert (again.id, again.attempts) == (a1.id, 1)
    assert claim(outbox) == []
    assert outbox.finish(again, DONE, worker=WORKER) is True
    assert heads(claim(outbox)) == {("A", 2)}
    assert events(engine, a1.id)[-3:] == [("retried", "operator"), ("claimed", WORKER), ("done", WORKER)]


def test_a_non_blocking_failure_lets_the_key_go_on(outbox: Outbox, engine: Engine) -> None:
    # Given key A with two moves, its head claimed
    enqueue(outbox, "A")
    enqueue(outbox, "A")
    (a1,) = claim(outbox)

    # When the head fails for good without blocking
    failed = Finish(status=MoveStatus.FAILED, blocking=False, kind="failed", error="gone")
    assert outbox.finish(a1, failed, worker=WORKER) is True

    # Then the next move of the key is claimable right away
    assert heads(claim(outbox)) == {("A", 2)}
    row = move_row(engine, a1.id)
    assert (row["status"], row["blocking"], row["last_error"]) == ("failed", False, "gone")
    assert row["finished_at"] is not None


# --------------------------------------------------------------------------------------------------
# Leases: fencing and recovery


def test_an_expired_lease_is_taken_over_and_fences_the_old_holder(outbox: Outbox, engine: Engine) -> None:
    # Given a move claimed by w1 under a 0.2 s lease that w1 stops renewing
    enqueue(outbox, "A")
    (old,) = claim(outbox, worker="w1", lease_seconds=0.2)
    time.sleep(0.3)

    # When w2 recovers expired leases and claims again
    assert outbox.recover_expired(worker="w2", max_attempts=5, block=False) == 1
    (new,) = claim(outbox, worker="w2")

    # Then the move is w2's: second attempt, a new lease token
    assert (new.id, new.attempts) == (old.id, 2)
    assert new.lease_token != old.lease_token
    # And w1 can neither renew, checkpoint nor finish it
    assert outbox.renew({old.id: old.lease_token}, lease_seconds=LEASE) == set()
    assert outbox.checkpoint(old, "stale-etag") is False
    assert outbox.finish(old, DONE, worker="w1") is False
    row = move_row(engine, old.id)
    assert (row["status"], row["worker"], row["lease_token"], row["target_etag"]) == (
        "running",
        "w2",
        new.lease_token,
        None,
    )
    assert row["last_error"] == "worker w1 stopped renewing its lease during attempt 1"
    # While w2 renews and finishes it
    assert outbox.renew({new.id: new.lease_token}, lease_seconds=LEASE) == {new.id}
    assert outbox.finish(new, DONE, worker="w2") is True
    assert move_row(engine, old.id)["status"] == "done"
    # And the audit trail tells the story, with who did what
    assert events(engine, old.id) == [
        ("enqueued", WORKER),
        ("claimed", "w1"),
        ("lease_expired", "w2"),
        ("claimed", "w2"),
        ("done", "w2"),
    ]
    with engine.connect() as conn:
        detail = conn.execute(
            text("SELECT detail FROM reactor.move_events WHERE move_id = :id AND kind = 'lease_expired'"),
            {"id": old.id},
        ).scalar_one()
    assert detail == {"previous_worker": "w1", "attempt": 1, "status": "pending"}


@pytest.mark.parametrize("block", [True, False])
def test_a_lease_lost_on_the_last_attempt_fails_the_move(outbox: Outbox, engine: Engine, block: bool) -> None:
    # Given key A with two moves, its head claimed under a short lease, with one attempt allowed
    enqueue(outbox, "A")
    enqueue(outbox, "A")
    (a1,) = claim(outbox, worker="w1", lease_seconds=0.2)
    time.sleep(0.3)

    # When the lease is recovered with max_attempts reached
    assert outbox.recover_expired(worker="w2", max_attempts=1, block=block) == 1

    # Then the move is failed (blocking only under the block policy) ...
    row = move_row(engine, a1.id)
    assert (row["status"], row["blocking"], row["lease_token"]) == ("failed", block, None)
    assert row["finished_at"] is not None
    assert row["last_error"] == "worker w1 stopped renewing its lease during attempt 1"
    # ... and the key's next move is held back exactly when blocking
    assert heads(claim(outbox)) == (set() if block else {("A", 2)})


def test_recover_leaves_unexpired_leases_alone(outbox: Outbox, engine: Engine) -> None:
    # Given a move held under a long lease
    enqueue(outbox, "A")
    (a1,) = claim(outbox, worker="w1")

    # When another instance recovers expired leases
    recovered = outbox.recover_expired(worker="w2", max_attempts=5, block=False)

    # Then nothing is taken from w1
    assert recovered == 0
    row = move_row(engine, a1.id)
    assert (row["status"], row["worker"], row["lease_token"]) == ("running", "w1", a1.lease_token)


# --------------------------------------------------------------------------------------------------
# Enqueue next to running moves


def test_an_unsafe_upload_is_recorded_failed_and_does_not_block_its_key(
    outbox: Outbox, engine: Engine
) -> None:
    # Given an upload whose target could never be written
    bad = outbox.enqueue(new_move(upload(), "A", error="target key escapes the prefix"), worker=WORKER)

    # When the next upload of the same key arrives
    good = enqueue(outbox, "A")

    # Then the unsafe one took seq 1 and is failed at once, with its error, never claimed
    assert bad.move_id is not None
    assert bad.seq == 1
    row = move_row(engine, bad.move_id)
    assert (row["status"], row["blocking"], row["last_error"], row["attempts"]) == (
        "failed",
        False,
        "target key escapes the prefix",
        0,
    )
    assert row["finished_at"] is not None
    assert events(engine, bad.move_id) == [("failed", WORKER)]
    # And the next one (seq 2) is claimable
    (claimed,) = claim(outbox)
    assert (claimed.id, claimed.seq) == (good.move_id, 2)


def test_enqueue_does_not_wait_for_a_move_in_progress(outbox: Outbox, engine: Engine) -> None:
    # Given key K's head claimed and still running
    enqueue(outbox, "K")
    (running,) = claim(outbox)
    result: list[Enqueued] = []
    errors: list[BaseException] = []

    def enqueue_next() -> None:
        try:
            result.append(outbox.enqueue(new_move(upload(), "K"), worker=WORKER))
        except BaseException as exc:  # reported by the test thread below
            errors.append(exc)

    # When another upload of K is enqueued from another thread
    thread = threading.Thread(target=enqueue_next, daemon=True)
    thread.start()
    thread.join(timeout=5)

    # Then it completed (it did not wait for the running move) and got the next seq
    assert not thread.is_alive(), "enqueue blocked behind a running move"
    assert errors == []
    assert [r.seq for r in result] == [2]
    assert move_row(engine, running.id)["status"] == "running"


def test_a_finish_racing_an_enqueue_of_the_same_key_never_strands_the_new_move(outbox: Outbox) -> None:
    # Given a claimed head of key K
    enqueue(outbox, "K")
    (head,) = claim(outbox)
    barrier = threading.Barrier(2, timeout=10)

    def finish(move: ClaimedMove) -> bool:
        barrier.wait()
        return outbox.finish(move, DONE, worker=WORKER)

    def enqueue_next() -> Enqueued:
        barrier.wait()
        return outbox.enqueue(new_move(upload(), "K"), worker=WORKER)

    with ThreadPoolExecutor(max_workers=2) as pool:
        for round_ in range(200):
            # When the head is finished and a new move of K is enqueued at the same moment
            finished = pool.submit(finish, head)
            enqueued = pool.submit(enqueue_next)
            assert finished.result(timeout=30) is True
            new = enqueued.result(timeout=30)
            # Then whichever committed first, the new move is K's claimable head
            claimed = claim(outbox)
            assert [(m.id, m.seq) for m in claimed] == [(new.move_id, round_ + 2)], f"round {round_}"
            head = claimed[0]


# --------------------------------------------------------------------------------------------------
# The audit trail and the claim's plan


def test_move_events_are_append_only(outbox: Outbox, engine: Engine) -> None:
    # Given a move with its 'enqueued' event
    move_id = enqueue(outbox, "A").move_id

    # When anyone rewrites the event
    with pytest.raises(DBAPIError, match="append-only") as refused, engine.begin() as conn:
        conn.execute(
            text("UPDATE reactor.move_events SET kind = 'done' WHERE move_id = :id"), {"id": move_id}
        )

    # Then the trigger refuses it and the event is unchanged
    assert isinstance(refused.value.orig, psycopg.errors.RaiseException)
    assert move_id is not None
    assert events(engine, move_id) == [("enqueued", WORKER)]


def _plan_nodes(plan: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield plan
    for child in plan.get("Plans", []):
        yield from _plan_nodes(child)


def test_the_claim_query_reads_indexes_not_the_history(engine: Engine, database_url: str) -> None:
    # Given a long history (20,000 done moves over 10,000 keys) and 200 keys with a pending head,
    # written in bulk and analyzed, so the planner's choice is the one it would make in production
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO reactor.order_keys (order_key, last_seq) "
                "SELECT 'done-' || k, 2 FROM generate_series(1, 10000) k"
            )
        )
        conn.execute(
            text(
                "INSERT INTO reactor.moves (order_key, seq, rule, via, source_bucket, source_key, etag, size,"
                " target_bucket, target_key, status, attempts, started_at, finished_at)"
                " SELECT 'done-' || k, s, 'r', 'webhook', 'src', 'done/' || k || '/' || s, 'e', 1,"
                "        'dst', 'moved/' || k || '/' || s, 'done', 1, now(), now()"
                "   FROM generate_series(1, 10000) k CROSS JOIN generate_series(1, 2) s"
            )
        )
        conn.execute(
            text(
                "INSERT INTO reactor.order_keys (order_key, last_seq, head_seq, ready_at) "
                "SELECT 'ready-' || k, 1, 1, now() - k * interval '1 ms' FROM generate_series(1, 200) k"
            )
        )
        conn.execute(
            text(
                "INSERT INTO reactor.moves (order_key, seq, rule, via, source_bucket, source_key, etag, size,"
                " target_bucket, target_key)"
                " SELECT 'ready-' || k, 1, 'r', 'webhook', 'src', 'ready/' || k, 'e', 1,"
                "        'dst', 'moved/ready/' || k"
                "   FROM generate_series(1, 200) k"
            )
        )
    with engine.begin() as conn:
        conn.execute(text("ANALYZE reactor.order_keys, reactor.moves"))
    with engine.connect() as conn:
        counts = conn.execute(
            text(
                "SELECT count(*) FILTER (WHERE status = 'done') AS done,"
                " count(*) FILTER (WHERE status = 'pending') AS pending FROM reactor.moves"
            )
        ).one()
    assert (counts.done, counts.pending) == (20_000, 200)

    # When claims run (rolled back) with auto_explain reporting the plan of the statement inside
    # reactor.claim_moves, the first custom plans and the generic plan PL/pgSQL may switch to
    plans = claim_plans(conninfo(database_url), limit=10, runs=7)
    assert len(plans) == 7

    # Then no node scans the whole of moves (or of order_keys), and keys are found through the small
    # ready_at index, in every one of them
    for plan in plans:
        nodes = list(_plan_nodes(plan))
        scans = {(n["Node Type"], n.get("Relation Name"), n.get("Index Name")) for n in nodes}
        seq_scanned = {relation for node_type, relation, _ in scans if node_type == "Seq Scan"}
        assert "moves" not in seq_scanned, scans
        assert "order_keys" not in seq_scanned, scans
        assert "ix_order_keys_ready_at" in {
            n.get("Index Name") for n in nodes if n.get("Relation Name") == "order_keys"
        }, scans


def test_a_limited_claim_takes_the_heads_ready_longest(outbox: Outbox, engine: Engine) -> None:
    # Given keys made ready at distinct times
    for key in ("late", "early", "middle"):
        enqueue(outbox, key)
    with engine.begin() as conn:
        conn.execute(
            text(
                "UPDATE reactor.order_keys SET ready_at = now() - CASE order_key"
                " WHEN 'early' THEN interval '3 s' WHEN 'middle' THEN interval '2 s' ELSE interval '1 s' END"
            )
        )

    # When a worker claims fewer than are ready
    claimed = outbox.claim(2, worker=WORKER, lease_seconds=LEASE)

    # Then it takes the ones ready longest, and leaves the other ready
    assert {m.order_key for m in claimed} == {"early", "middle"}
    assert heads(claim(outbox)) == {("late", 1)}


def test_an_enqueue_that_makes_a_new_head_notifies_listeners(outbox: Outbox, database_url: str) -> None:
    # Given a connection listening on the wake-up channel
    with psycopg.connect(conninfo(database_url), autocommit=True) as listener:
        listener.execute("LISTEN reactor_moves")
        # When a key gets its first move, then a second one behind it
        outbox.enqueue(new_move(upload("a.jpg"), "N"), worker=WORKER)
        first = list(listener.notifies(timeout=2.0, stop_after=1))
        outbox.enqueue(new_move(upload("b.jpg"), "N"), worker=WORKER)
        second = list(listener.notifies(timeout=0.5))
    # Then only the new head woke the pollers
    assert [n.channel for n in first] == ["reactor_moves"]
    assert second == []


def test_an_enqueue_says_whether_its_move_is_runnable_at_once(outbox: Outbox) -> None:
    # When a key gets its first move, a second one behind it, and the first again (a duplicate)
    first = outbox.enqueue(new_move(upload("a.jpg"), "H"), worker=WORKER)
    second = outbox.enqueue(new_move(upload("b.jpg"), "H"), worker=WORKER)
    again = outbox.enqueue(new_move(upload("a.jpg"), "H"), worker=WORKER)
    # Then only the first is its key's head (the enqueuing instance wakes its own poller for it)
    assert (first.is_head, second.is_head) == (True, False)
    assert again.duplicate
    assert not again.is_head


def test_a_batch_enqueue_numbers_each_key_in_input_order_and_skips_duplicates(outbox: Outbox) -> None:
    # Given one move already recorded
    outbox.enqueue(new_move(upload("x/1.jpg"), "B"), worker=WORKER)
    # When a batch mixes two keys, a duplicate of it, and a duplicate within the batch
    batch = [
        new_move(upload("x/2.jpg"), "B"),
        new_move(upload("y/1.jpg"), "A"),
        new_move(upload("x/1.jpg"), "B"),
        new_move(upload("x/3.jpg"), "B"),
        new_move(upload("y/1.jpg"), "A"),
    ]
    results = outbox.enqueue_many(batch, worker=WORKER)
    # Then results come back in input order, seqs are gap-free per key, duplicates get none
    assert [(r.seq, r.duplicate) for r in results] == [
        (2, False),
        (1, False),
        (None, True),
        (3, False),
        (None, True),
    ]


def test_finish_and_claim_takes_the_keys_next_move_in_the_same_round_trip(outbox: Outbox) -> None:
    # Given a key with two moves, the first claimed
    enqueue(outbox, "one")
    enqueue(outbox, "one")
    (first,) = claim(outbox)
    # When its outcome is recorded with room for one more claim
    recorded, claimed = outbox.finish_and_claim([(first, DONE)], limit=1, worker=WORKER, lease_seconds=LEASE)
    # Then the same statement recorded it and claimed the key's next move
    assert recorded == {first.id}
    assert heads(claimed) == {("one", 2)}


def test_a_head_made_ready_while_a_finish_waits_for_a_lock_is_claimed_by_it(
    outbox: Outbox, engine: Engine
) -> None:
    # Given a claimed move whose key another transaction holds locked
    enqueue(outbox, "busy")
    (held,) = claim(outbox)
    blocker = engine.connect()
    blocker.execute(text("SELECT 1 FROM reactor.order_keys WHERE order_key = 'busy' FOR UPDATE"))
    try:
        # When its finish-and-claim starts, waits for that lock, and meanwhile another key gets a head
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(
                outbox.finish_and_claim, [(held, DONE)], limit=5, worker=WORKER, lease_seconds=LEASE
            )
            time.sleep(0.3)
            assert not pending.done()
            enqueue(outbox, "late")  # committed after the finish-and-claim statement started
            blocker.rollback()
            recorded, claimed = pending.result(timeout=10)
    finally:
        blocker.close()
    # Then that statement claims the new head too (ready_at is compared with the clock, not with the
    # statement's start), instead of leaving it to the next poll
    assert recorded == {held.id}
    assert heads(claimed) == {("late", 1)}


def test_the_one_move_finish_function_is_the_batch_transition(outbox: Outbox, engine: Engine) -> None:
    # Given a claimed move, and a stale lease token for it
    enqueue(outbox, "single")
    enqueue(outbox, "single")
    (move,) = claim(outbox)
    call = text(
        "SELECT reactor.finish_move(:id, CAST(:lease AS uuid), 'done', false, 0, NULL, NULL, NULL, 'done',"
        " 'by-hand', '{}'::jsonb)"
    )
    with engine.begin() as conn:
        # When reactor.finish_move is called with the wrong token, then with the right one
        stale = conn.execute(call, {"id": move.id, "lease": "00000000-0000-0000-0000-000000000000"}).scalar()
        fresh = conn.execute(call, {"id": move.id, "lease": str(move.lease_token)}).scalar()
    # Then only the holder's call counts, records one event, and readies the key's next move
    assert (stale, fresh) == (False, True)
    assert move_row(engine, move.id)["status"] == "done"
    assert events(engine, move.id)[-1] == ("done", "by-hand")
    assert heads(claim(outbox)) == {("single", 2)}
