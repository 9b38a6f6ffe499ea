"""Properties of the pure core, checked on generated input (hypothesis).

1. Parsing a notification never raises anything but EventError, whatever the bytes or JSON, and what it
   returns can be stored as is.
2. Key decoding round-trips every key MinIO can encode; NFC and NFD forms stay different keys; listen
   keys are never decoded.
3. Matching and rendering never yield an unsafe target (empty, '.' or '..' segment, leading '/') without
   target_error, and a safe target stays inside the template's literal prefix in the target bucket.
"""

from __future__ import annotations

import copy
import json
import math
import posixpath
import string
import unicodedata
from collections.abc import Mapping
from typing import Any

import pytest
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

from reactor.domain import Ignored, Notice, Upload
from reactor.errors import EventError, RuleError
from reactor.events import (
    MAX_ETAG_BYTES,
    MAX_KEY_BYTES,
    MAX_SIZE,
    MAX_VERSION_ID_BYTES,
    parse_listen_event,
    parse_webhook_body,
)
from reactor.rules import Rule, RuleSet

# No example database: the tests leave nothing behind in the checkout, and every run starts fresh.
FUZZ = settings(max_examples=400, deadline=None, database=None)
MANY = settings(max_examples=1_000, deadline=None, database=None)

SEQUENCER = "18757F6A3C7D1B2E"
RECORD: dict[str, Any] = {
    "eventVersion": "2.0",
    "eventSource": "minio:s3",
    "awsRegion": "",
    "eventTime": "2025-11-06T09:17:17.161Z",
    "eventName": "s3:ObjectCreated:Put",
    "userIdentity": {"principalId": "minioadmin"},
    "requestParameters": {"principalId": "minioadmin", "region": "", "sourceIPAddress": "127.0.0.1"},
    "responseElements": {"x-amz-request-id": "18757F6A3C5C2E0B"},
    "s3": {
        "s3SchemaVersion": "1.0",
        "configurationId": "Config",
        "bucket": {
            "name": "images",
            "ownerIdentity": {"principalId": "minioadmin"},
            "arn": "arn:aws:s3:::images",
        },
        "object": {
            "key": "detect%2Ft1%2Fa.jpg",
            "size": 48213,
            "eTag": "9b2cf535f27731c974343645a3985328",
            "contentType": "image/jpeg",
            "userMetadata": {"content-type": "image/jpeg"},
            "versionId": "",
            "sequencer": SEQUENCER,
        },
    },
    "source": {"host": "127.0.0.1", "port": "", "userAgent": "MinIO (linux; amd64) minio-go/v7.0.95"},
}


def record_with(key: str) -> dict[str, Any]:
    result = copy.deepcopy(RECORD)
    result["s3"]["object"]["key"] = key
    return result


def webhook_body(*records: Mapping[str, Any]) -> bytes:
    return json.dumps({"EventName": "s3:ObjectCreated:Put", "Records": list(records)}).encode()


# --------------------------------------------------------------------------------------------------
# Go's url.QueryEscape, written out: what MinIO's webhook target does to a key


UNRESERVED = frozenset((string.ascii_letters + string.digits + "-_.~").encode())


def go_query_escape(text: str) -> str:
    """Every byte of the UTF-8 encoding: unreserved kept, space as '+', the rest as upper-case %XX."""
    out = []
    for byte in text.encode("utf-8"):
        if byte == 0x20:
            out.append("+")
        elif byte in UNRESERVED:
            out.append(chr(byte))
        else:
            out.append(f"%{byte:02X}")
    return "".join(out)


def test_the_encoder_agrees_with_go() -> None:
    # Outputs of Go's url.QueryEscape for the same inputs.
    assert go_query_escape("a b+c/d%e~f_g-h.i") == "a+b%2Bc%2Fd%25e~f_g-h.i"
    assert go_query_escape("测试") == "%E6%B5%8B%E8%AF%95"
    assert go_query_escape("\x00\x7f\n") == "%00%7F%0A"


def _parsed_key(encoded: str) -> str:
    (notice,) = parse_webhook_body(webhook_body(record_with(encoded)))
    assert isinstance(notice, Upload)
    return notice.key


# Keys MinIO can hold: non-empty valid UTF-8 without NUL, at most 1,024 bytes. (MinIO also refuses
# '//' and '.'/'..' segments; decoding must round-trip those all the same, so they are not excluded.)
KEY_CHARS = st.characters(exclude_categories=["Cs"], exclude_characters="\x00")
TRICKY_CHARS = st.sampled_from(
    [*"+%/ ~._-aZ09", "%2F", "%25", "%%", "+%2B", "\t", "\n", "\r", "\x01", "\x1f", "\x7f", "\x80", "\xa0",
     "é", "e\u0301", "€", "😀", "\ufeff", "\u2028", "\ufffd", "\U0010ffff", "测试"]
)  # fmt: skip
MINIO_KEYS = st.one_of(
    st.text(KEY_CHARS, min_size=1, max_size=120),
    st.lists(TRICKY_CHARS, min_size=1, max_size=60).map("".join),
).filter(lambda key: len(key.encode()) <= MAX_KEY_BYTES)


@st.composite
def full_length_keys(draw: st.DrawFn) -> str:
    """Keys of exactly 1,024 bytes, made of one (possibly multi-byte) character and ASCII filler."""
    char = draw(KEY_CHARS)
    width = len(char.encode())
    return char * (MAX_KEY_BYTES // width) + "a" * (MAX_KEY_BYTES % width)


@FUZZ
@given(MINIO_KEYS)
@example("a b+c/d%e")
@example("%41")  # must stay "%41", not become "A"
@example("+")
@example("\x01\x7f\n\r\t")
@example("a" * MAX_KEY_BYTES)
@example("é" * (MAX_KEY_BYTES // 2))
@example("😀" * (MAX_KEY_BYTES // 4))
def test_webhook_keys_round_trip_through_go_query_escape(key: str) -> None:
    assert _parsed_key(go_query_escape(key)) == key


@FUZZ
@given(full_length_keys())
def test_keys_of_exactly_1024_bytes_round_trip(key: str) -> None:
    assert len(key.encode()) == MAX_KEY_BYTES
    assert _parsed_key(go_query_escape(key)) == key


@FUZZ
@given(full_length_keys(), KEY_CHARS)
def test_keys_over_1024_bytes_are_an_event_error(key: str, extra: str) -> None:
    with pytest.raises(EventError, match="1024 bytes"):
        parse_webhook_body(webhook_body(record_with(go_query_escape(key + extra))))


@FUZZ
@given(st.text(KEY_CHARS, max_size=20), st.text(KEY_CHARS, max_size=20))
def test_a_nul_in_a_key_is_an_event_error(before: str, after: str) -> None:
    with pytest.raises(EventError, match="NUL"):
        parse_webhook_body(webhook_body(record_with(go_query_escape(before + "\x00" + after))))


@FUZZ
@given(st.binary(min_size=1, max_size=40).filter(lambda data: not _is_utf8(data)))
@example(b"\xff")
@example(b"\xc0\xaf")
@example(b"\xed\xa0\x80")
def test_escapes_that_are_not_utf8_are_an_event_error(data: bytes) -> None:
    encoded = "".join(f"%{byte:02X}" for byte in data)
    with pytest.raises(EventError, match="do not decode to UTF-8"):
        parse_webhook_body(webhook_body(record_with(encoded)))


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


@FUZZ
@given(MINIO_KEYS)
@example("a+b%2Fc")
@example("%FF")
def test_listen_keys_are_never_decoded(key: str) -> None:
    for raw in (key, go_query_escape(key)):
        (notice,) = parse_listen_event({"Records": [record_with(raw)]})
        assert isinstance(notice, Upload)
        assert notice.key == raw


# Text whose NFC and NFD forms differ: composed letters, combining marks and Hangul.
COMPOSABLE = st.text(
    st.sampled_from(
        [*"aeouAnc .-_+%", "é", "è", "ë", "ñ", "ç", "Å", "ệ", "가", "각", "\u0301", "\u0308", "\u0323"]
    ),
    min_size=1,
    max_size=20,
)


@FUZZ
@given(COMPOSABLE)
@example("café")
def test_nfc_and_nfd_forms_stay_different_keys_matches_and_targets(text: str) -> None:
    nfc, nfd = unicodedata.normalize("NFC", text), unicodedata.normalize("NFD", text)
    assume(nfc != nfd)
    # Decoded exactly, each to its own form
    assert _parsed_key(go_query_escape(f"in/{nfc}")) == f"in/{nfc}"
    assert _parsed_key(go_query_escape(f"in/{nfd}")) == f"in/{nfd}"
    # Matched and rendered without normalising
    rules = RuleSet(rules=(Rule(name="r", source_bucket="src", pattern="in/{name}", target_bucket="dst",
                                target="out/{name}", order_key="{name}"),))  # fmt: skip
    composed, decomposed = rules.match("src", f"in/{nfc}"), rules.match("src", f"in/{nfd}")
    assert composed is not None
    assert decomposed is not None
    assert (composed.target_key, composed.order_key) == (f"out/{nfc}", nfc)
    assert (decomposed.target_key, decomposed.order_key) == (f"out/{nfd}", nfd)
    # A literal in a pattern matches its own form only
    literal = Rule(name="r", source_bucket="src", pattern=f"{nfc}/{{f}}", target_bucket="dst", target="{f}")
    assert literal.match(f"{nfc}/x") == {"f": "x"}
    assert literal.match(f"{nfd}/x") is None


# --------------------------------------------------------------------------------------------------
# Parsing never raises anything but EventError, and what it returns can be stored


VOCABULARY = ["Records", "eventName", "s3", "bucket", "name", "object", "key", "eTag", "size", "versionId",
              "sequencer", "source", "userAgent", "eventTime", "userMetadata"]  # fmt: skip
NAMES = st.one_of(st.sampled_from(VOCABULARY), st.text(max_size=6))
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=MAX_SIZE - 2, max_value=MAX_SIZE + 2),
    st.floats(),
    st.text(max_size=12),
    st.sampled_from(["s3:ObjectCreated:Put", "s3:ObjectCreated:Copy", "images", "null", "%FF", "%00", "\x00",
                     "reactor-mover", '""', "0", "ABCDEF", "1" * 17, "%E6%B5", "\ufffe"]),
)  # fmt: skip
JSON_VALUES = st.recursive(
    SCALARS,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(NAMES, children, max_size=5),
    max_leaves=30,
)
FRAGMENTS = [
    *(
        b"{",
        b"}",
        b"[",
        b"]",
        b":",
        b",",
        b'"',
        b" ",
        b"\\",
        b"null",
        b"true",
        b"1",
        b"-0",
        b"1e999",
        b"9" * 30,
    ),
    *(b'"Records"', b'"s3"', b'"object"', b'"key"', b'"size"', b'"eventName"', b'"s3:ObjectCreated:Put"'),
    *(b"NaN", b"-Infinity", b'"\\ud800"', b'"\\u0000"', b"%FF", b"%00"),
    *(b"\xff", b"\xc0\xaf", b"\xed\xa0\x80", b"\xef\xbb\xbf"),
]
# Fields the parser reads, which damage can make the record invalid or ignored ...
CHECKED_PATHS = [
    *(("eventName",), ("eventTime",), ("source",), ("source", "userAgent")),
    *(("s3",), ("s3", "bucket"), ("s3", "bucket", "name"), ("s3", "object"), ("s3", "object", "key")),
    *(("s3", "object", "eTag"), ("s3", "object", "size"), ("s3", "object", "versionId")),
    *(("s3", "object", "sequencer"),),
]
# ... and fields it passes through, where anything keeps an upload an upload that must still be storable.
FREE_PATHS = [
    *(("awsRegion",), ("eventVersion",), ("userIdentity",), ("requestParameters",), ("responseElements",)),
    *(("s3", "bucket", "arn"), ("s3", "object", "contentType"), ("s3", "object", "userMetadata")),
    *(("source", "host"), ("surprise",), ("s3", "object", "surprise")),
]
_DELETE = object()


def check_notices(notices: list[Notice]) -> None:
    """What the parser returns is well-formed and can go into PostgreSQL as is."""
    assert isinstance(notices, list)
    for notice in notices:
        assert isinstance(notice, Upload | Ignored)
        if isinstance(notice, Ignored):
            assert all(isinstance(value, str) for value in (notice.bucket, notice.key, notice.reason))
            continue
        assert notice.bucket
        assert notice.key
        assert "\x00" not in notice.key
        assert len(notice.key.encode("utf-8")) <= MAX_KEY_BYTES
        assert notice.etag
        assert len(notice.etag.encode("utf-8")) <= MAX_ETAG_BYTES
        assert type(notice.size) is int
        assert 0 <= notice.size <= MAX_SIZE
        assert notice.version_id != "null"
        assert len(notice.version_id.encode("utf-8")) <= MAX_VERSION_ID_BYTES
        assert notice.sequencer == "" or (
            len(notice.sequencer) == 16 and set(notice.sequencer) <= set("0123456789ABCDEF")
        )
        for text in (notice.bucket, notice.etag, notice.version_id, notice.event_time, notice.user_agent):
            assert "\x00" not in text
            text.encode("utf-8")  # no lone surrogate
        assert_storable_json(notice.raw)
        json.dumps(dict(notice.raw), allow_nan=False)


def assert_storable_json(value: Any, depth: int = 0) -> None:
    assert depth < 2_000
    if isinstance(value, str):
        assert "\x00" not in value
        value.encode("utf-8")
    elif isinstance(value, float):
        assert math.isfinite(value)
    elif isinstance(value, Mapping):
        for name, item in value.items():
            assert_storable_json(name, depth + 1)
            assert_storable_json(item, depth + 1)
    elif isinstance(value, list | tuple):
        for item in value:
            assert_storable_json(item, depth + 1)


def parse_body(data: bytes) -> None:
    try:
        notices = parse_webhook_body(data)
    except EventError:
        return
    check_notices(notices)


def parse_listen(event: Any) -> None:
    try:
        notices = parse_listen_event(event)
    except EventError:
        return
    check_notices(notices)


@FUZZ
@given(st.binary(max_size=600))
@example(b"[" * 100_000)
@example(b'{"Records": [' + b"1" * 5_000 + b"]}")  # an integer longer than Python converts
@example(
    b'{"Records": [{"eventName": "s3:ObjectCreated:Put", "s3": {"object": {"size": ' + b"9" * 5_000 + b"}}}]}"
)
@example(b"\xef\xbb\xbf{}")
def test_any_bytes_give_notices_or_event_error(data: bytes) -> None:
    parse_body(data)


@FUZZ
@given(st.lists(st.sampled_from(FRAGMENTS), max_size=60).map(b"".join))
def test_json_like_bytes_give_notices_or_event_error(data: bytes) -> None:
    parse_body(data)


@FUZZ
@given(JSON_VALUES)
def test_any_json_document_gives_notices_or_event_error(document: Any) -> None:
    parse_body(json.dumps(document).encode())
    parse_body(json.dumps({"Records": document}).encode())
    parse_body(json.dumps({"Records": [document]}).encode())
    parse_listen(document)
    parse_listen({"Records": document})
    parse_listen({"Records": [document]})


@st.composite
def damaged_records(draw: st.DrawFn) -> dict[str, Any]:
    """MinIO's record with one to three fields replaced by any JSON value, or removed."""
    record: dict[str, Any] = copy.deepcopy(
        draw(st.sampled_from([record_with("detect%2Ft1%2Fa.jpg"), record_with("a")]))
    )
    paths = st.sampled_from(FREE_PATHS if draw(st.booleans()) else CHECKED_PATHS + FREE_PATHS)
    for path in draw(st.lists(paths, min_size=1, max_size=3, unique=True)):
        node: Any = record
        for name in path[:-1]:
            node = node.get(name) if isinstance(node, dict) else None
        if not isinstance(node, dict):
            continue  # an earlier change replaced a parent
        value = draw(st.one_of(st.just(_DELETE), JSON_VALUES))
        if value is _DELETE:
            node.pop(path[-1], None)
        else:
            node[path[-1]] = value
    return record


@settings(max_examples=600, deadline=None, database=None)
@given(st.lists(damaged_records(), min_size=1, max_size=3))
def test_damaged_records_give_notices_or_event_error(records: list[dict[str, Any]]) -> None:
    parse_body(webhook_body(*records))
    parse_listen({"Records": records})


# --------------------------------------------------------------------------------------------------
# Matching and rendering


KEY_SEGMENTS = st.one_of(
    st.sampled_from(
        [".", "..", "", "...", "a", "b.c", "..a", "a..", " ", "é", "e\u0301", "日本", "+", "%2F"]
    ),
    st.sampled_from(["%2E%2E", "~", "\n", "\\", "..\\", "\uff0e\uff0e", "\u2024\u2024"]),
    st.text(KEY_CHARS, max_size=4),
)
PATTERN_LITERALS = ["in", "a", "x.y", ".", "..", "", "é", "e\u0301", "+"]
TARGET_LITERALS = ["out", "t.d", "é", "a b", "..x", "x..", "~", "_"]
AFFIXES = ["", "", ".", "-", "x", ".."]


@st.composite
def rules_and_keys(draw: st.DrawFn) -> tuple[Rule, list[str | tuple[str, bool]], str, str]:
    """A rule (pattern of literal and field segments, target over its fields), the pattern as tokens,
    the template's literal prefix, and a key: made to fit the pattern, or drawn freely."""
    count = draw(st.integers(1, 4))
    field_at = draw(st.integers(0, count - 1))  # at least one field
    tokens: list[str | tuple[str, bool]] = []  # literal text, or (field name, is a path field)
    pattern_segments = []
    for index in range(count):
        if index != field_at and draw(st.booleans()):
            literal = draw(st.sampled_from(PATTERN_LITERALS))
            pattern_segments.append(literal)
            tokens.append(literal + ("/" if index < count - 1 else ""))
            continue
        name, path = f"f{index}", draw(st.booleans())
        before, after = draw(st.sampled_from(AFFIXES)), draw(st.sampled_from(AFFIXES))
        pattern_segments.append(f"{before}{{{name}{':path' if path else ''}}}{after}")
        tokens.extend([before, (name, path), after + ("/" if index < count - 1 else "")])
    fields = [token[0] for token in tokens if isinstance(token, tuple)]
    target_segments = []
    for _ in range(draw(st.integers(1, 4))):
        if draw(st.booleans()):
            target_segments.append(draw(st.sampled_from(TARGET_LITERALS)))
        else:
            names = draw(st.lists(st.sampled_from(fields), min_size=1, max_size=2))
            joint = draw(st.sampled_from(["", "-", "."]))
            before, after = draw(st.sampled_from(AFFIXES)), draw(st.sampled_from(AFFIXES))
            target_segments.append(before + joint.join(f"{{{name}}}" for name in names) + after)
    target = "/".join(target_segments)
    try:
        rule = Rule(name="r", source_bucket="src", pattern="/".join(pattern_segments), target_bucket="dst",
                    target=target)  # fmt: skip
    except RuleError:
        assume(False)  # a target whose literal text alone is unsafe is refused at load (tested elsewhere)
        raise
    if draw(st.booleans()):
        parts = []
        for token in tokens:
            if isinstance(token, str):
                parts.append(token)
            elif token[1]:
                parts.append("/".join(draw(st.lists(KEY_SEGMENTS, min_size=1, max_size=3))))
            else:
                parts.append(draw(KEY_SEGMENTS.filter(lambda segment: "/" not in segment)))
        key = "".join(parts)
    else:
        key = "/".join(draw(st.lists(KEY_SEGMENTS, min_size=1, max_size=6)))
    return rule, tokens, target.split("{", 1)[0], key


def is_unsafe(key: str) -> bool:
    return key == "" or key.startswith("/") or any(seg in ("", ".", "..") for seg in key.split("/"))


@MANY
@given(rules_and_keys())
@example(
    (Rule(name="r", source_bucket="src", pattern="{p:path}", target_bucket="dst", target="out/{p}"),
     [("p", True)], "out/", "a/../../etc")
)  # fmt: skip
@example(
    (Rule(name="r", source_bucket="src", pattern="{a}/{b}", target_bucket="dst", target=".{a}/{b}"),
     [("a", False), "/", ("b", False)], "", "./x")
)  # fmt: skip
def test_targets_are_safe_or_carry_an_error(
    case: tuple[Rule, list[str | tuple[str, bool]], str, str],
) -> None:
    rule, tokens, prefix, key = case
    rules = RuleSet(rules=(rule,))
    match = rules.match("src", key)
    values = rule.match(key)
    if match is None:
        assert values is None
        return
    assert values is not None
    # The values are what the pattern promises, and put back into it they give the key.
    for token in tokens:
        if isinstance(token, tuple):
            value = values[token[0]]
            assert value
            assert "" not in value.split("/") if token[1] else "/" not in value
    assert "".join(token if isinstance(token, str) else values[token[0]] for token in tokens) == key
    assert match.target_bucket == "dst"
    target = match.target_key
    assert (match.target_error is not None) == is_unsafe(target), (target, match.target_error)
    if match.target_error is None:
        # Nothing to normalise away, so nothing can climb out of the literal prefix.
        assert posixpath.normpath(target) == target
        assert target.startswith(prefix)
        assert posixpath.normpath(posixpath.join("/bucket", target)).startswith(
            posixpath.join("/bucket", prefix)
        )
    else:
        assert repr(target) in match.target_error
        assert repr(key) in match.target_error
