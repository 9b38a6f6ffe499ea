"""The move decision table: pure functions from what S3 showed to what the move does next.

A move of version (ETag E, version id V) from source to target goes COPY -> VERIFY -> DELETE.
Every function here is one row group of that table; the mover only performs I/O between them.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from reactor.domain import MoveStatus, OnConflict


class Next(StrEnum):
    COPY = "copy"  # go on: copy the source to the target
    DELETE = "delete"  # the target holds the named version: remove the source


@dataclass(frozen=True, kw_only=True)
class Verdict:
    """A final outcome for this attempt."""

    status: MoveStatus
    note: str | None = None
    error: str | None = None
    permanent: bool = False  # a failure no retry can fix


@dataclass(frozen=True, kw_only=True)
class Seen:
    """An object as a HEAD showed it."""

    etag: str
    size: int


def holds_version(target: Seen | None, *, etag: str, size: int, checkpoint_etag: str | None) -> bool:
    """Whether the target already holds the named version, as far as ETags alone can prove it.

    A single-part source's copy has the same ETag (the MD5). A multipart source's copy gets a
    new ETag; the mover records it (checkpoint_etag) once it has proven the bytes equal.
    """
    if target is None or target.size != size:
        return False
    return target.etag == etag or (checkpoint_etag is not None and target.etag == checkpoint_etag)


def on_claim(*, newer_version_moved: bool) -> Verdict | None:
    """Before touching S3: an older version must never be copied over a newer one."""
    if newer_version_moved:
        return Verdict(
            status=MoveStatus.SUPERSEDED,
            note="a newer upload of this key was already moved; this older version is not copied over it",
        )
    return None


def on_existing_target(*, policy: OnConflict, target: Seen | None, same_bytes: bool) -> Next | Verdict:
    """Before the copy (only asked when the policy is not overwrite)."""
    if target is None:
        return Next.COPY
    if same_bytes:
        return Next.DELETE
    if policy is OnConflict.OVERWRITE:
        return Next.COPY
    if policy is OnConflict.SKIP:
        return Verdict(
            status=MoveStatus.DONE,
            note=f"on_conflict=skip: the target already held different bytes (ETag {target.etag}); "
            "left both the target and the source untouched",
        )
    return Verdict(
        status=MoveStatus.FAILED,
        permanent=True,
        error=f"on_conflict=fail: the target already holds different bytes (ETag {target.etag}); "
        "remove or rename the target object, then run `reactor retry` for this move",
    )


def on_copy_refused(*, target_holds_version: bool) -> Next | Verdict:
    """The copy was refused: the source is gone or is no longer the named version."""
    if target_holds_version:
        # An earlier attempt copied it and stopped before recording: finish the delete.
        return Next.DELETE
    return Verdict(
        status=MoveStatus.SUPERSEDED,
        note="the source no longer holds the named version (overwritten or deleted first); nothing written",
    )


def on_verify(*, target: Seen | None, size: int, bytes_equal: bool) -> str | None:
    """After the copy: None when the target is proven to hold the named bytes, else the error."""
    if target is None:
        return "the target is missing right after the copy"
    if target.size != size:
        return f"the target has {target.size} bytes after the copy, expected {size}"
    if not bytes_equal:
        return f"the target's content (ETag {target.etag}) differs from the named version after the copy"
    return None


def on_delete(*, versioned: bool, source: Seen | None, etag: str) -> Next | Verdict:
    """Before removing the source of an unversioned bucket: never delete a newer upload."""
    if versioned:
        return Next.DELETE  # exactly the copied version is removed; newer versions are untouched
    if source is None:
        return Verdict(status=MoveStatus.DONE, note="the source was already gone")
    if source.etag == etag:
        return Next.DELETE
    return Verdict(
        status=MoveStatus.DONE,
        note=f"the source now holds a newer upload (ETag {source.etag}); left it for its own move",
    )


def backoff(attempt: int, *, base: float, cap: float, jitter: float) -> float:
    """Exponential backoff before retry number `attempt` (1-based); jitter in [0, 1) spreads herds."""
    delay: float = min(cap, base * 2.0 ** max(0, attempt - 1))
    return delay * (0.5 + jitter / 2.0)


@dataclass(frozen=True, kw_only=True)
class AfterError:
    status: MoveStatus  # pending (retry later) or failed
    blocking: bool
    retry_delay: float


def after_error(
    *, attempts: int, max_attempts: int, permanent: bool, block_on_failure: bool, delay: float
) -> AfterError:
    """An attempt failed: retry later, or give up (and block the key when configured to)."""
    if permanent or attempts >= max_attempts:
        return AfterError(status=MoveStatus.FAILED, blocking=block_on_failure, retry_delay=0.0)
    return AfterError(status=MoveStatus.PENDING, blocking=False, retry_delay=delay)
