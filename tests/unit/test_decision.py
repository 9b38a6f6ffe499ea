"""The move decision table, row by row, without any service."""

from __future__ import annotations

import pytest

from reactor import decision
from reactor.decision import Next, Seen, Verdict
from reactor.domain import MoveStatus, OnConflict

E = "0123456789abcdef0123456789abcdef"
OTHER = "ffffffffffffffffffffffffffffffff"


@pytest.mark.parametrize(
    ("target", "checkpoint", "expected"),
    [
        (None, None, False),
        (Seen(etag=E, size=10), None, True),
        (Seen(etag=E, size=11), None, False),  # same ETag but another size: not ours
        (Seen(etag=OTHER, size=10), None, False),
        (Seen(etag=OTHER, size=10), OTHER, True),  # a multipart copy proven earlier
    ],
)
def test_holds_version(target: Seen | None, checkpoint: str | None, expected: bool) -> None:
    assert decision.holds_version(target, etag=E, size=10, checkpoint_etag=checkpoint) is expected


def test_on_claim_supersedes_when_a_newer_version_was_moved() -> None:
    verdict = decision.on_claim(newer_version_moved=True)
    assert verdict is not None
    assert verdict.status is MoveStatus.SUPERSEDED
    assert decision.on_claim(newer_version_moved=False) is None


@pytest.mark.parametrize(
    ("policy", "target", "same", "expected"),
    [
        (OnConflict.SKIP, None, False, Next.COPY),
        (OnConflict.FAIL, None, False, Next.COPY),
        (OnConflict.SKIP, Seen(etag=E, size=1), True, Next.DELETE),
        (OnConflict.FAIL, Seen(etag=E, size=1), True, Next.DELETE),
        (OnConflict.OVERWRITE, Seen(etag=OTHER, size=1), False, Next.COPY),
        (OnConflict.SKIP, Seen(etag=OTHER, size=1), False, MoveStatus.DONE),
        (OnConflict.FAIL, Seen(etag=OTHER, size=1), False, MoveStatus.FAILED),
    ],
)
def test_on_existing_target(
    policy: OnConflict, target: Seen | None, same: bool, expected: Next | MoveStatus
) -> None:
    result = decision.on_existing_target(policy=policy, target=target, same_bytes=same)
    if isinstance(expected, Next):
        assert result is expected
    else:
        assert isinstance(result, Verdict)
        assert result.status is expected
        assert OTHER in (result.note or result.error or "")


def test_on_existing_target_fail_is_permanent_and_says_what_to_do() -> None:
    result = decision.on_existing_target(
        policy=OnConflict.FAIL, target=Seen(etag=OTHER, size=1), same_bytes=False
    )
    assert isinstance(result, Verdict)
    assert result.permanent
    assert "reactor retry" in (result.error or "")


def test_on_copy_refused() -> None:
    assert decision.on_copy_refused(target_holds_version=True) is Next.DELETE
    refused = decision.on_copy_refused(target_holds_version=False)
    assert isinstance(refused, Verdict)
    assert refused.status is MoveStatus.SUPERSEDED


@pytest.mark.parametrize(
    ("target", "equal", "problem"),
    [
        (None, True, "missing"),
        (Seen(etag=E, size=9), True, "9 bytes"),
        (Seen(etag=OTHER, size=10), False, "differs"),
        (Seen(etag=E, size=10), True, None),
    ],
)
def test_on_verify(target: Seen | None, equal: bool, problem: str | None) -> None:
    result = decision.on_verify(target=target, size=10, bytes_equal=equal)
    if problem is None:
        assert result is None
    else:
        assert result is not None
        assert problem in result


@pytest.mark.parametrize(
    ("versioned", "source", "expected"),
    [
        (True, Seen(etag=OTHER, size=1), Next.DELETE),  # the exact version goes; newer ones stay
        (False, None, MoveStatus.DONE),
        (False, Seen(etag=E, size=1), Next.DELETE),
        (False, Seen(etag=OTHER, size=1), MoveStatus.DONE),  # a newer upload is never deleted
    ],
)
def test_on_delete(versioned: bool, source: Seen | None, expected: Next | MoveStatus) -> None:
    result = decision.on_delete(versioned=versioned, source=source, etag=E)
    if isinstance(expected, Next):
        assert result is expected
    else:
        assert isinstance(result, Verdict)
        assert result.status is expected


def test_backoff_grows_exponentially_and_is_capped() -> None:
    delays = [decision.backoff(n, base=1.0, cap=10.0, jitter=1.0) for n in range(1, 7)]
    assert delays == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0]
    assert decision.backoff(3, base=1.0, cap=100.0, jitter=0.0) == 2.0  # jitter halves at most


@pytest.mark.parametrize(
    ("attempts", "permanent", "block", "status", "blocking"),
    [
        (1, False, False, MoveStatus.PENDING, False),
        (4, False, True, MoveStatus.PENDING, False),
        (5, False, False, MoveStatus.FAILED, False),
        (5, False, True, MoveStatus.FAILED, True),
        (1, True, False, MoveStatus.FAILED, False),
        (1, True, True, MoveStatus.FAILED, True),
    ],
)
def test_after_error(attempts: int, permanent: bool, block: bool, status: MoveStatus, blocking: bool) -> None:
    result = decision.after_error(
        attempts=attempts, max_attempts=5, permanent=permanent, block_on_failure=block, delay=3.0
    )
    assert result.status is status
    assert result.blocking is blocking
    assert result.retry_delay == (3.0 if status is MoveStatus.PENDING else 0.0)
