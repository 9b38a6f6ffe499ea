"""Loads the named SQL statements from sql/queries.sql once."""

from __future__ import annotations

import re
from functools import cache
from importlib import resources

from sqlalchemy import TextClause, text

_NAME = re.compile(r"^-- name: (\w+)\s*$", re.MULTILINE)


@cache
def _load() -> dict[str, TextClause]:
    source = resources.files("reactor").joinpath("sql/queries.sql").read_text(encoding="utf-8")
    parts = _NAME.split(source)
    # parts = [preamble, name1, body1, name2, body2, ...]
    return {name: text(body.strip()) for name, body in zip(parts[1::2], parts[2::2], strict=True)}


def query(name: str) -> TextClause:
    """The named statement; a KeyError here is a programming error."""
    return _load()[name]
