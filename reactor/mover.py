"""Executes one move against the object store: copy if still that version, verify, delete.

It knows nothing of the database: the poller hands it a MoveOrder and records what it returns.
Every step is safe to repeat, so a move cut short at any point (crash, kill -9, lost lease) is
finished correctly by whichever worker runs it next.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from reactor import decision
from reactor.decision import Next, Seen, Verdict
from reactor.domain import MoveStatus, OnConflict
from reactor.objectstore import ObjectInfo, ObjectStore


@dataclass(frozen=True, kw_only=True)
class MoveOrder:
    """One move of version (etag, version_id) of source_bucket/source_key to the target."""

    source_bucket: str
    source_key: str
    version_id: str
    etag: str
    size: int
    target_bucket: str
    target_key: str
    on_conflict: OnConflict = OnConflict.OVERWRITE
    checkpoint_etag: str | None = None  # the target ETag an earlier attempt proved equal
    newer_version_moved: bool = False

    @property
    def versioned(self) -> bool:
        return bool(self.version_id)

    @property
    def multipart(self) -> bool:
        return "-" in self.etag


@dataclass(frozen=True, kw_only=True)
class MoveResult:
    status: MoveStatus  # done, superseded, or failed (the poller decides retry or give up)
    note: str | None = None
    error: str | None = None
    permanent: bool = False
    target_etag: str | None = None
    steps: tuple[str, ...] = ()


class MoveHooks(Protocol):
    """Called around the steps that change S3, so the caller can stop a move whose lease is lost,
    record progress, or (in tests) inject a crash at an exact point."""

    def before_step(self, step: str) -> None: ...

    def checkpoint(self, target_etag: str) -> None: ...


class NoHooks:
    def before_step(self, step: str) -> None:
        pass

    def checkpoint(self, target_etag: str) -> None:
        pass


def _seen(info: ObjectInfo | None) -> Seen | None:
    return None if info is None else Seen(etag=info.etag, size=info.size)


class Mover:
    """Runs the decision table of reactor.decision against an ObjectStore."""

    def __init__(self, store: ObjectStore) -> None:
        self.store = store

    def execute(self, order: MoveOrder, hooks: MoveHooks | None = None) -> MoveResult:
        hooks = hooks or NoHooks()
        steps: list[str] = []

        def verdict(v: Verdict, target_etag: str | None = None) -> MoveResult:
            return MoveResult(
                status=v.status,
                note=v.note,
                error=v.error,
                permanent=v.permanent,
                target_etag=target_etag,
                steps=tuple(steps),
            )

        early = decision.on_claim(newer_version_moved=order.newer_version_moved)
        if early is not None:
            return verdict(early)

        step: Next | Verdict = Next.COPY
        target: ObjectInfo | None = None
        if order.on_conflict is not OnConflict.OVERWRITE:
            target = self.store.stat(order.target_bucket, order.target_key)
            steps.append("stat-target")
            same = target is not None and self._target_has_source_bytes(target, order)
            step = decision.on_existing_target(
                policy=order.on_conflict, target=_seen(target), same_bytes=same
            )
            if isinstance(step, Verdict):
                return verdict(step)

        target_etag: str | None = None
        if step is Next.DELETE and target is not None and order.multipart:
            # Proven equal by hashing just now: remember it before the source goes.
            hooks.checkpoint(target.etag)
            target_etag = target.etag
        if step is Next.COPY:
            hooks.before_step("copy")
            copied = self.store.copy(
                bucket=order.source_bucket,
                key=order.source_key,
                version_id=order.version_id,
                if_match=order.etag,
                target_bucket=order.target_bucket,
                target_key=order.target_key,
                size=order.size,
            )
            steps.append("copy" if copied is not None else "copy-refused")
            if copied is None:
                target = self.store.stat(order.target_bucket, order.target_key)
                steps.append("stat-target")
                holds = decision.holds_version(
                    _seen(target), etag=order.etag, size=order.size, checkpoint_etag=order.checkpoint_etag
                )
                step = decision.on_copy_refused(target_holds_version=holds)
                if isinstance(step, Verdict):
                    return verdict(step)
            else:
                hooks.before_step("verify")
                target = self.store.stat(order.target_bucket, order.target_key)
                steps.append("verify")
                equal = target is not None and self._target_has_source_bytes(target, order)
                problem = decision.on_verify(target=_seen(target), size=order.size, bytes_equal=equal)
                if problem is not None or target is None:
                    return MoveResult(status=MoveStatus.FAILED, error=problem, steps=tuple(steps))
                target_etag = target.etag
                if order.multipart:
                    # The copy's ETag differs from a multipart source's: remember the proven one
                    # before the source goes, so a re-run after a crash can still recognise it.
                    hooks.checkpoint(target.etag)

        hooks.before_step("delete")
        if not order.versioned:
            source = self.store.stat(order.source_bucket, order.source_key)
            steps.append("stat-source")
            step = decision.on_delete(versioned=False, source=_seen(source), etag=order.etag)
            if isinstance(step, Verdict):
                return verdict(step, target_etag)
        self.store.remove(order.source_bucket, order.source_key, order.version_id)
        steps.append("delete")
        return MoveResult(status=MoveStatus.DONE, target_etag=target_etag, steps=tuple(steps))

    def _target_has_source_bytes(self, target: ObjectInfo, order: MoveOrder) -> bool:
        """Prove the target's bytes equal the named version's.

        Single-part: equal ETags are equal MD5s. Multipart: the copy is a single-part object
        whose ETag is the MD5 of its bytes, so the source's bytes are streamed (only while it is
        still that version, If-Match) and their MD5 compared; a multipart target (copies over
        5 GiB) is compared by SHA-256 of both.
        """
        if target.size != order.size:
            return False
        if target.etag == order.etag or (
            order.checkpoint_etag is not None and target.etag == order.checkpoint_etag
        ):
            return True
        if not order.multipart:
            return False
        algorithm = "md5" if "-" not in target.etag else "sha256"
        source_digest = self.store.digest(
            order.source_bucket,
            order.source_key,
            version_id=order.version_id,
            if_match=order.etag,
            algorithm=algorithm,
        )
        if source_digest is None:
            return False
        if algorithm == "md5":
            return source_digest == target.etag
        target_digest = self.store.digest(
            order.target_bucket, order.target_key, if_match=target.etag, algorithm=algorithm
        )
        return target_digest == source_digest
