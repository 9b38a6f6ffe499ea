"""Rendering CLI reports: aligned tables that fit a terminal, CSV, JSON lines; time filters."""

from __future__ import annotations

import csv
import io
import json
import re
import unicodedata
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from reactor.errors import ConfigError

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhdw])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_since(value: str, *, now: datetime | None = None) -> datetime:
    """'30m', '2h', '7d', '1w' ago, or an ISO 8601 time (UTC when it names no zone)."""
    now = now or datetime.now(UTC)
    text = value.strip().lower()
    match = _DURATION.match(text)
    if match:
        return now - timedelta(seconds=float(match.group(1)) * _UNITS[match.group(2)])
    try:
        moment = datetime.fromisoformat(value.strip())
    except ValueError:
        raise ConfigError(
            f"--since {value!r} is neither a duration (30m, 2h, 7d, 1w) nor an ISO time (2026-12-04T10:00)"
        ) from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def width(text: str) -> int:
    """Terminal columns: East Asian wide and full-width characters take two, combining marks none."""
    total = 0
    for char in text:
        if unicodedata.combining(char):
            continue
        total += 2 if unicodedata.east_asian_width(char) in ("W", "F") else 1
    return total


def shorten(text: str, limit: int) -> str:
    """Fit text into `limit` columns, keeping both ends (keys differ at the end as often as not)."""
    if width(text) <= limit:
        return text
    if limit <= 1:
        return "…"[:limit]
    head, tail = [], []
    budget = limit - 1
    left, right = 0, len(text) - 1
    take_left = True
    while left <= right:
        char = text[left] if take_left else text[right]
        w = width(char)
        if w > budget:
            break
        budget -= w
        if take_left:
            head.append(char)
            left += 1
        else:
            tail.append(char)
            right -= 1
        take_left = not take_left
    return "".join(head) + "…" + "".join(reversed(tail))


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, datetime):
        return value.astimezone(UTC).strftime("%m-%d %H:%M:%S")
    if isinstance(value, timedelta):
        return f"{value.total_seconds():.0f}s"
    return str(value)


def table(rows: Sequence[dict[str, Any]], columns: Sequence[str], *, max_width: int = 80) -> str:
    """Aligned columns within max_width: the widest text columns give way first, shortened in the middle."""
    cells = [[_cell(row.get(c)) for c in columns] for row in rows]
    widths = [max([width(c), *(width(r[i]) for r in cells)]) for i, c in enumerate(columns)]
    gap = 2
    while sum(widths) + gap * (len(widths) - 1) > max_width:
        widest = max(range(len(widths)), key=lambda i: widths[i])
        if widths[widest] <= max(6, width(columns[widest])):
            break
        widths[widest] -= 1

    def line(values: Sequence[str]) -> str:
        parts = []
        for value, w in zip(values, widths, strict=True):
            shown = shorten(value, w)
            parts.append(shown + " " * (w - width(shown)))
        return (" " * gap).join(parts).rstrip()

    out = [line(list(columns))]
    out.extend(line(r) for r in cells)
    if not rows:
        out.append("(none)")
    return "\n".join(out)


def to_csv(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow(["" if row.get(c) is None else _json_value(row.get(c)) for c in columns])
    return buffer.getvalue().rstrip("\n")


def _json_value(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.astimezone(UTC).isoformat()
    if isinstance(value, timedelta):
        return value.total_seconds()
    return value


def to_json_lines(rows: Sequence[dict[str, Any]]) -> str:
    return "\n".join(
        json.dumps({k: _json_value(v) for k, v in row.items()}, ensure_ascii=False, default=str)
        for row in rows
    )
