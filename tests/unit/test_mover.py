"""The mover against an in-memory twin of S3: every path of the decision table, every crash point."""

from __future__ import annotations

import inspect

import pytest

from reactor.domain import MoveStatus, OnConflict
from reactor.errors import ObjectStoreError
from reactor.mover import MoveOrder, Mover
from reactor.objectstore import MinioStore, ObjectStore
from tests.support.memstore import MemoryStore, failing

SRC, DST = "images", "alerts"


def order_for(store: MemoryStore, key: str, data: bytes, *, parts: int = 1, **overrides: object) -> MoveOrder:
    info = store.put(SRC, key, data, parts=parts)
    fields: dict[str, object] = {
        "source_bucket": SRC,
        "source_key": key,
        "version_id": info.version_id,
        "etag": info.etag,
        "size": info.size,
        "target_bucket": DST,
        "target_key": key,
    }
    fields.update(overrides)
    return MoveOrder(**fields)  # type: ignore[arg-type]


class Recorder:
    def __init__(self, store: MemoryStore | None = None, on: str = "", action: object = None) -> None:
        self.steps: list[str] = []
        self.checkpoints: list[str] = []
        self.store, self.on, self.action = store, on, action

    def before_step(self, step: str) -> None:
        self.steps.append(step)
        if step == self.on and callable(self.action):
            self.action()

    def checkpoint(self, target_etag: str) -> None:
        self.checkpoints.append(target_etag)


def test_memory_twin_exposes_the_same_methods_as_the_minio_adapter() -> None:
    port = {n for n, _ in inspect.getmembers(ObjectStore, inspect.isfunction) if not n.startswith("_")}
    assert port <= {n for n in dir(MinioStore) if not n.startswith("_")}
    assert port <= {n for n in dir(MemoryStore) if not n.startswith("_")}


def test_happy_path_moves_the_bytes_and_removes_the_source() -> None:
    # Given an upload
    store = MemoryStore()
    order = order_for(store, "det/t1/a.jpg", b"alpha")
    # When it is moved
    result = Mover(store).execute(order)
    # Then the target holds its bytes and the source is gone
    assert result.status is MoveStatus.DONE
    assert store.data(DST, "det/t1/a.jpg") == b"alpha"
    assert store.data(SRC, "det/t1/a.jpg") is None
    assert result.steps == ("copy", "verify", "stat-source", "delete")


def test_source_overwritten_before_the_move_is_superseded_and_nothing_is_written() -> None:
    store = MemoryStore()
    order = order_for(store, "k", b"old")
    store.put(SRC, "k", b"new")
    result = Mover(store).execute(order)
    assert result.status is MoveStatus.SUPERSEDED
    assert store.data(DST, "k") is None
    assert store.data(SRC, "k") == b"new"


def test_source_deleted_before_the_move_is_superseded() -> None:
    store = MemoryStore()
    order = order_for(store, "k", b"x")
    store.remove(SRC, "k")
    assert Mover(store).execute(order).status is MoveStatus.SUPERSEDED


@pytest.mark.parametrize("crash_before", ["verify", "delete"])
def test_a_crash_after_the_copy_is_finished_by_the_next_run(crash_before: str) -> None:
    # Given a first run that dies after copying
    store = MemoryStore()
    order = order_for(store, "k", b"payload")

    def crash() -> None:
        raise SystemExit("killed")

    with pytest.raises(SystemExit):
        Mover(store).execute(order, Recorder(on=crash_before, action=crash))
    assert store.data(DST, "k") == b"payload"
    assert store.data(SRC, "k") == b"payload"
    # When a fresh worker runs the same move
    result = Mover(store).execute(order)
    # Then it completes: verified target, source removed
    assert result.status is MoveStatus.DONE
    assert store.data(DST, "k") == b"payload"
    assert store.data(SRC, "k") is None


def test_source_gone_and_target_holds_the_version_is_done() -> None:
    # Given a run that deleted the source but died before recording the finish
    store = MemoryStore()
    order = order_for(store, "k", b"payload")
    Mover(store).execute(order)
    # When the move is run again
    result = Mover(store).execute(order)
    # Then it is done without touching the target again
    assert result.status is MoveStatus.DONE
    assert result.steps == ("copy-refused", "stat-target", "stat-source")
    assert store.data(DST, "k") == b"payload"


def test_a_newer_upload_landing_during_the_move_is_never_deleted() -> None:
    store = MemoryStore()
    order = order_for(store, "k", b"first")
    hooks = Recorder(on="delete", action=lambda: store.put(SRC, "k", b"second"))
    result = Mover(store).execute(order, hooks)
    assert result.status is MoveStatus.DONE
    assert "newer upload" in (result.note or "")
    assert store.data(SRC, "k") == b"second"
    assert store.data(DST, "k") == b"first"


def test_versioned_source_deletes_exactly_the_moved_version() -> None:
    store = MemoryStore(versioned_buckets={SRC})
    order = order_for(store, "k", b"v1")
    store.put(SRC, "k", b"v2")
    result = Mover(store).execute(order)
    assert result.status is MoveStatus.DONE
    assert store.data(DST, "k") == b"v1"
    assert [v.data for v in store.objects[(SRC, "k")]] == [b"v2"]


def test_versioned_source_whose_version_was_deleted_is_superseded() -> None:
    store = MemoryStore(versioned_buckets={SRC})
    order = order_for(store, "k", b"v1")
    store.remove(SRC, "k", order.version_id)
    assert Mover(store).execute(order).status is MoveStatus.SUPERSEDED


def test_multipart_source_is_verified_by_hashing_and_checkpointed_before_delete() -> None:
    # Given a multipart upload, whose copy gets a new (single-part) ETag
    store = MemoryStore()
    order = order_for(store, "big", b"m" * 1000, parts=3)
    hooks = Recorder()
    # When it is moved
    result = Mover(store).execute(order, hooks)
    # Then the bytes were hashed, the proven target ETag recorded before the delete
    assert result.status is MoveStatus.DONE
    assert "digest" in store.calls
    target = store.stat(DST, "big")
    assert target is not None
    assert hooks.checkpoints == [target.etag]
    assert hooks.steps == ["copy", "verify", "delete"]
    assert result.target_etag == target.etag


def test_multipart_rerun_after_the_delete_recognises_the_checkpointed_target() -> None:
    store = MemoryStore()
    order = order_for(store, "big", b"m" * 1000, parts=3)
    first = Mover(store).execute(order)
    rerun = Mover(store).execute(
        MoveOrder(**{**order.__dict__, "checkpoint_etag": first.target_etag})  # type: ignore[arg-type]
    )
    assert rerun.status is MoveStatus.DONE


def test_verification_failure_is_a_retryable_failure() -> None:
    store = MemoryStore()
    order = order_for(store, "k", b"abc")
    # A target that differs after the copy (something overwrote it in between)
    hooks = Recorder(on="verify", action=lambda: store.put(DST, "k", b"zzz"))
    result = Mover(store).execute(order, hooks)
    assert result.status is MoveStatus.FAILED
    assert not result.permanent
    assert store.data(SRC, "k") == b"abc"  # the source is kept until a verified copy exists


@pytest.mark.parametrize(
    ("policy", "status", "target_after", "source_after"),
    [
        (OnConflict.OVERWRITE, MoveStatus.DONE, b"new", None),
        (OnConflict.SKIP, MoveStatus.DONE, b"old", b"new"),
        (OnConflict.FAIL, MoveStatus.FAILED, b"old", b"new"),
    ],
)
def test_on_conflict_when_the_target_holds_different_bytes(
    policy: OnConflict, status: MoveStatus, target_after: bytes, source_after: bytes | None
) -> None:
    store = MemoryStore()
    store.put(DST, "k", b"old")
    order = order_for(store, "k", b"new", on_conflict=policy)
    result = Mover(store).execute(order)
    assert result.status is status
    assert store.data(DST, "k") == target_after
    assert store.data(SRC, "k") == source_after
    if policy is OnConflict.FAIL:
        assert result.permanent


def test_on_conflict_fail_with_the_same_bytes_at_the_target_is_no_conflict() -> None:
    store = MemoryStore()
    store.put(DST, "k", b"same")
    order = order_for(store, "k", b"same", on_conflict=OnConflict.FAIL)
    result = Mover(store).execute(order)
    assert result.status is MoveStatus.DONE
    assert store.data(SRC, "k") is None


def test_an_older_version_is_never_copied_over_a_newer_one() -> None:
    store = MemoryStore()
    order = order_for(store, "k", b"old", newer_version_moved=True)
    result = Mover(store).execute(order)
    assert result.status is MoveStatus.SUPERSEDED
    assert store.calls == []


def test_store_errors_propagate_for_the_poller_to_retry() -> None:
    store = MemoryStore()
    order = order_for(store, "k", b"x")
    store.fail = failing("remove")
    with pytest.raises(ObjectStoreError):
        Mover(store).execute(order)
    assert store.data(DST, "k") == b"x"  # copied and verified; the delete is redone next time
    assert Mover(store).execute(order).status is MoveStatus.DONE


def test_multipart_proven_equal_before_the_copy_is_checkpointed_before_the_delete() -> None:
    # Given a multipart upload already copied by an attempt that died before its checkpoint
    store = MemoryStore()
    order = order_for(store, "big", b"m" * 1000, parts=3, on_conflict=OnConflict.FAIL)
    assert store.copy(
        bucket=SRC, key="big", version_id="", if_match=order.etag, target_bucket=DST, target_key="big"
    )
    hooks = Recorder()
    # When the next attempt proves the target equal by hashing (policy fail sees no conflict)
    result = Mover(store).execute(order, hooks)
    # Then it records the proven ETag before deleting, so a third run could still recognise it
    target = store.stat(DST, "big")
    assert target is not None
    assert result.status is MoveStatus.DONE
    assert hooks.checkpoints == [target.etag]
    assert result.target_etag == target.etag
    assert store.data(SRC, "big") is None
