"""The chaos scenario of issue 3 (tests/chaos/harness.py): a short run in `make test`, the full one
in `make chaos`. Each prints its summary line; run with -s to see it and the progress."""

from __future__ import annotations

import pytest

from tests.chaos.harness import FULL, SHORT, Params, run_scenario


def check(params: Params) -> None:
    summary = run_scenario(params)
    print(summary.line())
    assert summary.ok, "\n".join([summary.line(), *summary.examples])


@pytest.mark.timeout(300)
def test_short_chaos_loses_duplicates_misorders_and_mixes_up_nothing() -> None:
    # Given 3 instances (two webhook targets and a listener, plus the sweep) on their own MinIO and
    # PostgreSQL, When 300 uploads over 12 tasks arrive through kills, restarts and a blackout,
    # Then every invariant count is 0
    check(SHORT)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_full_chaos_loses_duplicates_misorders_and_mixes_up_nothing() -> None:
    # The same with 3,000 uploads over 60 tasks by 8 uploaders and a 10 s blackout
    check(FULL)
