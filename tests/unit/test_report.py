"""CLI report rendering: terminal widths, shortening, CSV and JSON lines, --since parsing."""

from __future__ import annotations

import csv
import io
import json
from datetime import UTC, datetime, timedelta

import pytest

from reactor.errors import ConfigError
from reactor.report import parse_since, shorten, table, to_csv, to_json_lines, width

NOW = datetime(2026, 12, 4, 12, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("abc", 3), ("测试10", 6), ("猫", 2), ("e\u0301", 1), ("", 0), ("\uff21", 2)],
)
def test_width_counts_terminal_columns(text: str, expected: int) -> None:
    assert width(text) == expected


@pytest.mark.parametrize("limit", [1, 2, 5, 8, 12])
def test_shorten_fits_and_keeps_both_ends(limit: int) -> None:
    key = "detect/测试10/a long folder/猫 42.jpg"
    short = shorten(key, limit)
    assert width(short) <= limit
    if limit >= 5:
        assert short[0] == "d"
        assert short[-1] == "g"
        assert "…" in short


def test_table_fits_80_columns_and_aligns_wide_characters() -> None:
    rows = [
        {
            "move_id": n,
            "order_key": "测试10",
            "status": "done",
            "source_key": "detect/测试10/" + "x" * 90 + f"{n}.jpg",
        }
        for n in range(3)
    ]
    lines = table(rows, ("move_id", "order_key", "status", "source_key")).splitlines()
    assert len(lines) == 4
    assert max(width(line) for line in lines) <= 80
    # each column starts at the same terminal column on every line
    starts = {width(line[: line.index("done" if "done" in line else "status")]) for line in lines}
    assert len(starts) == 1


def test_empty_table_says_so() -> None:
    assert table([], ("a", "b")).splitlines() == ["a  b", "(none)"]


def test_csv_and_json_lines_keep_every_value() -> None:
    rows = [{"key": 'a,"b"\nc', "at": NOW, "n": None}]
    parsed = list(csv.reader(io.StringIO(to_csv(rows, ("key", "at", "n")))))
    assert parsed == [["key", "at", "n"], ['a,"b"\nc', "2026-12-04T12:00:00+00:00", ""]]
    assert json.loads(to_json_lines(rows)) == {
        "key": 'a,"b"\nc',
        "at": "2026-12-04T12:00:00+00:00",
        "n": None,
    }


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("30m", NOW - timedelta(minutes=30)),
        ("2h", NOW - timedelta(hours=2)),
        ("7d", NOW - timedelta(days=7)),
        ("1w", NOW - timedelta(weeks=1)),
        ("1.5h", NOW - timedelta(minutes=90)),
        ("2026-12-01T08:00", datetime(2026, 12, 1, 8, 0, tzinfo=UTC)),
        ("2026-12-01T08:00+02:00", datetime(2026, 12, 1, 6, 0, tzinfo=UTC)),
    ],
)
def test_parse_since(value: str, expected: datetime) -> None:
    assert parse_since(value, now=NOW) == expected


def test_parse_since_rejects_nonsense_and_says_what_works() -> None:
    with pytest.raises(ConfigError, match="30m, 2h, 7d"):
        parse_since("yesterday", now=NOW)
