"""Rules: which uploads move where, loaded from a TOML file and fully checked before anything moves.

A pattern is literal text with fields: ``{name}`` matches one non-empty path segment (or the part of one
that the literal text around it leaves), ``{name:path}`` matches one or more non-empty segments joined
by ``/``. ``{{`` and ``}}`` stand for literal braces. Targets and order keys are templates over the
pattern's fields. Keys are compared exactly as stored: no Unicode normalisation, no decoding.
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import re
import tomllib
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from reactor.domain import OnConflict
from reactor.errors import RuleError

__all__ = ["Match", "Rule", "RuleSet", "load_rules", "parse_rules"]

_REQUIRED_KEYS: Final = ("name", "source_bucket", "pattern", "target_bucket", "target")
_OPTIONAL_KEYS: Final = ("order_key", "on_conflict")
_ALLOWED_KEYS: Final = _REQUIRED_KEYS + _OPTIONAL_KEYS

_BUCKET_RE: Final = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_SEGMENT_RE: Final = "[^/]+"
_PATH_RE: Final = "[^/]+(?:/[^/]+)*"


class _Invalid(Exception):
    """A problem found while compiling one rule; the caller adds which file and rule."""


@dataclass(frozen=True)
class _Lit:
    text: str


@dataclass(frozen=True)
class _Field:
    name: str
    path: bool  # True for {name:path}


_Token = _Lit | _Field


def _tokenize(text: str, what: str, *, allow_path: bool) -> tuple[_Token, ...]:
    """Split a pattern or template into literal text and fields."""
    tokens: list[_Token] = []
    literal: list[str] = []
    i = 0
    while i < len(text):
        char = text[i]
        if char in "{}" and text.startswith(char * 2, i):
            literal.append(char)
            i += 2
            continue
        if char == "}":
            raise _Invalid(
                f"{what} {text!r} has an unmatched '}}' at position {i}; write '}}}}' for a literal brace"
            )
        if char != "{":
            literal.append(char)
            i += 1
            continue
        end = text.find("}", i + 1)
        if end < 0:
            raise _Invalid(
                f"{what} {text!r} has an unclosed '{{' at position {i}; write '{{{{' for a literal brace"
            )
        inner = text[i + 1 : end]
        name, colon, modifier = inner.partition(":")
        if not name.isidentifier():
            raise _Invalid(
                f"{what} {text!r} has '{{{inner}}}', which is not a field: a field name must be a Python "
                "identifier (letters, digits, underscores); write '{{' and '}}' for literal braces"
            )
        if colon and modifier != "path":
            raise _Invalid(
                f"{what} {text!r} has '{{{inner}}}' with unknown modifier {modifier!r}; "
                "the only modifier is ':path' (one or more whole segments)"
            )
        if colon and not allow_path:
            raise _Invalid(
                f"{what} {text!r} has '{{{inner}}}', but ':path' belongs in the pattern only; "
                f"write '{{{name}}}' here (the value is inserted verbatim, slashes included)"
            )
        if literal:
            tokens.append(_Lit("".join(literal)))
            literal = []
        tokens.append(_Field(name, bool(colon)))
        i = end + 1
    if literal:
        tokens.append(_Lit("".join(literal)))
    return tuple(tokens)


def _compile_pattern(pattern: str) -> tuple[tuple[_Token, ...], re.Pattern[str], tuple[str, ...]]:
    tokens = _tokenize(pattern, "pattern", allow_path=True)
    names: list[str] = []
    parts: list[str] = []
    previous: _Token | None = None
    for token in tokens:
        if isinstance(token, _Lit):
            parts.append(re.escape(token.text))
        else:
            if token.name in names:
                raise _Invalid(
                    f"pattern {pattern!r} uses field {{{token.name}}} more than once; "
                    "give each field its own name"
                )
            if isinstance(previous, _Field):
                # Two fields with nothing between them could split a value anywhere.
                raise _Invalid(
                    f"pattern {pattern!r} has fields {{{previous.name}}} and {{{token.name}}} side by side, "
                    "so where one ends is ambiguous; put literal text (such as '/' or '-') between them"
                )
            names.append(token.name)
            parts.append(f"({_PATH_RE if token.path else _SEGMENT_RE})")
        previous = token
    return tokens, re.compile("".join(parts)), tuple(names)


def _compile_template(text: str, what: str, pattern: str, kinds: Mapping[str, bool]) -> tuple[_Token, ...]:
    tokens = _tokenize(text, what, allow_path=False)
    for token in tokens:
        if isinstance(token, _Field) and token.name not in kinds:
            known = ", ".join(f"{{{name}}}" for name in kinds) or "none"
            raise _Invalid(
                f"{what} {text!r} uses field {{{token.name}}}, which pattern {pattern!r} does not define "
                f"(its fields: {known}); use one of the pattern's fields"
            )
    return tokens


def _render(tokens: Sequence[_Token], values: Mapping[str, str]) -> str:
    return "".join(token.text if isinstance(token, _Lit) else values[token.name] for token in tokens)


def _template_problem(tokens: Sequence[_Token]) -> str | None:
    """Why every key the template renders would be unsafe, judged from its literal segments alone."""
    segments: list[tuple[str, bool]] = []  # (literal text, holds a field)
    text, has_field = "", False
    for token in tokens:
        if isinstance(token, _Field):
            has_field = True
            continue
        for char in token.text:
            if char == "/":
                segments.append((text, has_field))
                text, has_field = "", False
            else:
                text += char
    segments.append((text, has_field))
    for index, (text, has_field) in enumerate(segments):
        if has_field:
            continue  # field values are non-empty, and their '.'/'..' are caught per key
        if text == "" and index == 0:
            return "starts with '/'"
        if text == "" and index == len(segments) - 1:
            return "ends with '/', which leaves an empty last segment"
        if text == "":
            return "has an empty segment ('//')"
        if text in (".", ".."):
            return f"has a {text!r} segment"
    return None


def _key_problem(key: str) -> str | None:
    """Why a rendered target key is unsafe to write, or None."""
    if not key:
        return "is empty"
    if key.startswith("/"):
        return "starts with '/'"
    segments = key.split("/")
    if ".." in segments:
        return "has a '..' segment"
    if "." in segments:
        return "has a '.' segment"
    if "" in segments:
        return "has an empty segment ('//' or a trailing '/')"
    return None


def _bucket_problem(bucket: str) -> str | None:
    if not _BUCKET_RE.fullmatch(bucket):
        return (
            "is not a valid bucket name: use 3-63 characters of lowercase letters, digits, '.' and '-', "
            "starting and ending with a letter or digit"
        )
    if ".." in bucket or ".-" in bucket or "-." in bucket:
        return "is not a valid bucket name: '.' may not sit next to another '.' or a '-'"
    try:
        ipaddress.IPv4Address(bucket)
    except ValueError:
        return None
    return "is not a valid bucket name: it looks like an IP address"


# A compiled pattern or target as an NFA without epsilon moves: state -> [(label, next state)], where a
# label is one character or None for "any character except '/'". Characters that appear in no literal
# behave alike in every automaton here, so comparing labels pairwise decides intersection exactly.
_Nfa = list[list[tuple[str | None, int]]]


def _nfa(atoms: Iterable[_Token]) -> tuple[_Nfa, int]:
    """The automaton of a token sequence, each field standing for its values, and its accepting state."""
    moves: _Nfa = [[]]

    def new_state() -> int:
        moves.append([])
        return len(moves) - 1

    current = 0
    for atom in atoms:
        if isinstance(atom, _Lit):
            for char in atom.text:
                nxt = new_state()
                moves[current].append((char, nxt))
                current = nxt
            continue
        inside = new_state()
        moves[current].append((None, inside))
        moves[inside].append((None, inside))
        if atom.path:
            after_slash = new_state()
            moves[inside].append(("/", after_slash))
            moves[after_slash].append((None, inside))
        current = inside
    return moves, current


def _common_char(left: str | None, right: str | None) -> str | None:
    """A character both labels accept, or None if there is none."""
    if left is None and right is None:
        return "x"
    if left is None:
        return right if right != "/" else None
    if right is None:
        return left if left != "/" else None
    return left if left == right else None


def _overlap(left: Iterable[_Token], right: Iterable[_Token]) -> str | None:
    """A key that both token sequences can produce, or None when their languages are disjoint."""
    left_moves, left_accept = _nfa(left)
    right_moves, right_accept = _nfa(right)
    start = (0, 0)
    came_from: dict[tuple[int, int], tuple[tuple[int, int], str] | None] = {start: None}
    queue = deque([start])
    while queue:
        pair = queue.popleft()
        if pair == (left_accept, right_accept):
            chars: list[str] = []
            step = came_from[pair]
            while step is not None:
                pair, char = step
                chars.append(char)
                step = came_from[pair]
            return "".join(reversed(chars))
        for left_label, left_next in left_moves[pair[0]]:
            for right_label, right_next in right_moves[pair[1]]:
                common = _common_char(left_label, right_label)
                nxt = (left_next, right_next)
                if common is not None and nxt not in came_from:
                    came_from[nxt] = (pair, common)
                    queue.append(nxt)
    return None


@dataclass(frozen=True, kw_only=True)
class Rule:
    """One rule: keys in source_bucket that match pattern move to target_bucket under target."""

    name: str
    source_bucket: str
    pattern: str
    target_bucket: str
    target: str
    order_key: str | None = None  # template, or None meaning "the source key"
    on_conflict: OnConflict = OnConflict.OVERWRITE
    _tokens: tuple[_Token, ...] = field(init=False, repr=False, compare=False)
    _regex: re.Pattern[str] = field(init=False, repr=False, compare=False)
    _names: tuple[str, ...] = field(init=False, repr=False, compare=False)
    _target_tokens: tuple[_Token, ...] = field(init=False, repr=False, compare=False)
    _target_atoms: tuple[_Token, ...] = field(init=False, repr=False, compare=False)
    _order_tokens: tuple[_Token, ...] | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        try:
            self._compile()
        except _Invalid as problem:
            raise RuleError(f"rule {self.name!r}: {problem}") from None

    def _compile(self) -> None:
        if not self.name:
            raise _Invalid("name is empty; give the rule a name")
        for key in ("source_bucket", "target_bucket"):
            bucket = getattr(self, key)
            problem = _bucket_problem(bucket)
            if problem:
                raise _Invalid(f"{key} {bucket!r} {problem}")
        for key in ("pattern", "target", "order_key"):
            if getattr(self, key) == "":
                raise _Invalid(f"{key} is empty; write a non-empty {key}")
        if not isinstance(self.on_conflict, OnConflict):
            raise _Invalid(f"on_conflict {self.on_conflict!r} is not one of {', '.join(OnConflict)}")
        tokens, regex, names = _compile_pattern(self.pattern)
        kinds = {token.name: token.path for token in tokens if isinstance(token, _Field)}
        target_tokens = _compile_template(self.target, "target", self.pattern, kinds)
        problem = _template_problem(target_tokens)
        if problem:
            raise _Invalid(
                f"target {self.target!r} {problem}; a target must be a relative key: fix the target"
            )
        order_tokens = None
        if self.order_key is not None:
            order_tokens = _compile_template(self.order_key, "order_key", self.pattern, kinds)
        # In the target a field stands for every value the pattern lets it take: that is what the loop
        # check must compare against other patterns.
        target_atoms = tuple(
            token if isinstance(token, _Lit) else _Field(token.name, kinds[token.name])
            for token in target_tokens
        )
        object.__setattr__(self, "_tokens", tokens)
        object.__setattr__(self, "_regex", regex)
        object.__setattr__(self, "_names", names)
        object.__setattr__(self, "_target_tokens", target_tokens)
        object.__setattr__(self, "_target_atoms", target_atoms)
        object.__setattr__(self, "_order_tokens", order_tokens)

    @property
    def prefix(self) -> str:
        """The pattern's literal text before its first field: what a MinIO prefix filter can use."""
        first = self._tokens[0] if self._tokens else None
        return first.text if isinstance(first, _Lit) else ""

    @property
    def fields(self) -> tuple[str, ...]:
        """The pattern's field names in order."""
        return self._names

    def match(self, key: str) -> dict[str, str] | None:
        """Field values when the whole key matches the pattern, else None."""
        found = self._regex.fullmatch(key)
        if found is None:
            return None
        return dict(zip(self._names, found.groups(), strict=True))

    def target_overlap(self, other: Rule) -> str | None:
        """A key this rule's target could render that other's pattern matches, or None if none can."""
        return _overlap(self._target_atoms, other._tokens)

    def render_target(self, values: Mapping[str, str]) -> str:
        """The target key for field values from match(); safety is judged by RuleSet.match."""
        return _render(self._target_tokens, values)

    def render_order_key(self, key: str, values: Mapping[str, str]) -> str:
        """The order key for a source key and its field values."""
        if self._order_tokens is None:
            return key
        return _render(self._order_tokens, values)


@dataclass(frozen=True, kw_only=True)
class Match:
    """What a rule decided for one key."""

    rule: Rule
    order_key: str
    target_bucket: str
    target_key: str
    target_error: str | None  # None when the rendered target is safe to write


@dataclass(frozen=True, kw_only=True)
class RuleSet:
    """Rules in file order; the first rule on a bucket whose pattern matches a key wins."""

    rules: tuple[Rule, ...]
    source: str = field(default="<rules>", repr=False, compare=False)  # named in error messages
    _by_bucket: dict[str, tuple[Rule, ...]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        rules = tuple(self.rules)
        object.__setattr__(self, "rules", rules)
        first_index: dict[str, int] = {}
        for index, rule in enumerate(rules):
            if rule.name in first_index:
                raise RuleError(
                    f"{self.source}: rule {rule.name!r} is defined twice (rules[{first_index[rule.name]}] "
                    f"and rules[{index}]); give each rule a unique name"
                )
            first_index[rule.name] = index
        by_bucket: dict[str, list[Rule]] = {}
        for rule in rules:
            by_bucket.setdefault(rule.source_bucket, []).append(rule)
        object.__setattr__(self, "_by_bucket", {bucket: tuple(found) for bucket, found in by_bucket.items()})
        for rule in rules:
            for other in self._by_bucket.get(rule.target_bucket, ()):
                example = rule.target_overlap(other)
                if example is None:
                    continue
                whose = "its own pattern" if other is rule else f"the pattern of rule {other.name!r}"
                raise RuleError(
                    f"{self.source}: rule {rule.name!r}: target {rule.target!r} in bucket "
                    f"{rule.target_bucket!r} can render a key that {whose} ({other.pattern!r}) matches, "
                    f"e.g. {example!r}: a moved object would be taken by a rule again (a loop, or a chain "
                    "that never runs because the reactor ignores its own writes); change the target, the "
                    "target bucket or the pattern so that they cannot overlap"
                )

    def match(self, bucket: str, key: str) -> Match | None:
        """The first rule in file order on this bucket whose pattern matches the key, rendered."""
        for rule in self._by_bucket.get(bucket, ()):
            values = rule.match(key)
            if values is None:
                continue
            target_key = rule.render_target(values)
            problem = _key_problem(target_key)
            target_error = None
            if problem == "has a '..' segment":
                target_error = (
                    f"rule {rule.name!r}: target {target_key!r} for key {key!r} {problem}; "
                    "a target is never written outside its path: fix the key or the rule"
                )
            elif problem is not None:
                target_error = (
                    f"rule {rule.name!r}: target {target_key!r} for key {key!r} {problem}; "
                    "such a target is never written: fix the key or the rule"
                )
            return Match(
                rule=rule,
                order_key=rule.render_order_key(key, values),
                target_bucket=rule.target_bucket,
                target_key=target_key,
                target_error=target_error,
            )
        return None

    @property
    def source_buckets(self) -> frozenset[str]:
        return frozenset(rule.source_bucket for rule in self.rules)

    @property
    def buckets(self) -> frozenset[str]:
        """Every bucket a rule names, as source or target."""
        return self.source_buckets | {rule.target_bucket for rule in self.rules}

    def prefixes(self, bucket: str) -> tuple[str, ...]:
        """The fewest literal prefixes that cover every rule on this source bucket, sorted."""
        kept: list[str] = []
        # Sorted order puts every prefix before the longer ones it covers.
        for prefix in sorted({rule.prefix for rule in self._by_bucket.get(bucket, ())}):
            if not any(prefix.startswith(shorter) for shorter in kept):
                kept.append(prefix)
        return tuple(kept)


def load_rules(path: str | os.PathLike[str]) -> RuleSet:
    """Read and check the rules file at path; RuleError says what is wrong and how to fix it."""
    file = Path(path)
    try:
        data = file.read_bytes()
    except FileNotFoundError:
        raise RuleError(
            f"REACTOR_RULES points at {str(file)!r} which does not exist: "
            "set REACTOR_RULES to the path of a rules file (see examples/rules.toml)"
        ) from None
    except OSError as error:
        raise RuleError(
            f"cannot read the rules file {str(file)!r}: {error.strerror or error}; "
            "make it a readable file or point REACTOR_RULES elsewhere"
        ) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise RuleError(
            f"{file}: not UTF-8 (byte {error.start}: {error.reason}); save the file as UTF-8"
        ) from None
    return parse_rules(text, str(file))


def parse_rules(text: str, source: str = "<rules>") -> RuleSet:
    """Check rules written as TOML text; source names the text in error messages."""
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise RuleError(f"{source}: not valid TOML: {error}; fix the syntax there") from None
    extra = sorted(set(document) - {"rules"})
    if extra:
        raise RuleError(
            f"{source}: unknown top-level key(s) {', '.join(map(repr, extra))}; the file holds only "
            "[[rules]] tables: remove them or move them into a [[rules]] table"
        )
    tables = document.get("rules")
    if tables is None or tables == []:
        raise RuleError(f"{source}: no [[rules]] tables; add at least one (see examples/rules.toml)")
    if not isinstance(tables, list):
        raise RuleError(
            f"{source}: 'rules' must be an array of tables written as [[rules]], got {_kind(tables)}; "
            "write each rule under its own [[rules]] header"
        )
    rules = [_rule_from_table(table, index, source) for index, table in enumerate(tables)]
    return RuleSet(rules=tuple(rules), source=source)


def _rule_from_table(table: Any, index: int, source: str) -> Rule:
    where = f"rules[{index}] (the [[rules]] table number {index + 1})"
    if not isinstance(table, dict):
        raise RuleError(f"{source}: {where} must be a table, got {_kind(table)}; write it under [[rules]]")
    name = table.get("name")
    if isinstance(name, str) and name:
        where = f"rule {name!r}"
    for key in table:
        if key not in _ALLOWED_KEYS:
            close = difflib.get_close_matches(key, _ALLOWED_KEYS, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise RuleError(
                f"{source}: {where}: unknown key {key!r}; {hint}the allowed keys are "
                f"{', '.join(_ALLOWED_KEYS)}: fix the spelling or remove it"
            )
    missing = [key for key in _REQUIRED_KEYS if key not in table]
    if missing:
        raise RuleError(f"{source}: {where}: missing required key(s) {', '.join(missing)}; add them")
    for key, value in table.items():
        if not isinstance(value, str):
            raise RuleError(f"{source}: {where}: {key} must be a string, got {_kind(value)}; quote it")
        if value == "":
            raise RuleError(f"{source}: {where}: {key} is empty; write a value or remove the key")
    on_conflict = table.get("on_conflict", OnConflict.OVERWRITE.value)
    if on_conflict not in {choice.value for choice in OnConflict}:
        raise RuleError(
            f"{source}: {where}: on_conflict {on_conflict!r} is not one of "
            f"{', '.join(OnConflict)}; pick one of them"
        )
    try:
        return Rule(
            name=table["name"],
            source_bucket=table["source_bucket"],
            pattern=table["pattern"],
            target_bucket=table["target_bucket"],
            target=table["target"],
            order_key=table.get("order_key"),
            on_conflict=OnConflict(on_conflict),
        )
    except RuleError as error:
        raise RuleError(f"{source}: {error}") from None


def _kind(value: object) -> str:
    """A TOML-ish name for a value's type, for messages."""
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return f"a number ({value!r})"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, str):
        return "a string"
    return f"a {type(value).__name__}"  # TOML dates and times
