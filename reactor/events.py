"""Parsing MinIO notifications (webhook bodies and listen events) into Upload and Ignored notices.

Whatever the input, the only exception raised is EventError, whose message names the offending path
(``Records[0].s3.object.size``): the webhook turns it into a response, and nothing else may escape.
"""

from __future__ import annotations

import json
import math
import re
import urllib.parse
from collections.abc import Callable, Mapping
from typing import Any, Final

from reactor.domain import Ignored, Notice, Upload
from reactor.errors import EventError

__all__ = [
    "MAX_ETAG_BYTES",
    "MAX_KEY_BYTES",
    "MAX_RECORDS",
    "MAX_SIZE",
    "MAX_VERSION_ID_BYTES",
    "REACTOR_USER_AGENT_MARK",
    "UPLOAD_EVENTS",
    "parse_listen_event",
    "parse_webhook_body",
]

REACTOR_USER_AGENT_MARK: Final[str] = "reactor-mover"
"""Part of the reactor's own S3 user agent: records of its own writes are ignored, never moved again."""

UPLOAD_EVENTS: Final[frozenset[str]] = frozenset(
    {
        "s3:ObjectCreated:Put",
        "s3:ObjectCreated:Post",
        "s3:ObjectCreated:CompleteMultipartUpload",
        "s3:ObjectCreated:Copy",
    }
)

MAX_RECORDS: Final[int] = 10_000

# Limits of what MinIO can describe, checked on every upload so that what passes can be stored: a NUL,
# a lone surrogate, NaN, an integer past bigint or an index entry past PostgreSQL's btree limit (about
# 2,700 bytes for bucket, key, version and eTag together) would fail the INSERT, and the webhook would
# answer 500 and promise a retry that can never succeed.
MAX_KEY_BYTES: Final[int] = 1024  # S3's limit: MinIO refuses a longer key
MAX_VERSION_ID_BYTES: Final[int] = 1024  # S3's limit for version ids (MinIO's are 36-character UUIDs)
MAX_ETAG_BYTES: Final[int] = 256  # an MD5 in hex, with "-N" for multipart uploads: 45 at most in practice
MAX_SIZE: Final[int] = 2**63 - 1  # Go's int64 in MinIO, bigint in PostgreSQL

_HEX_RE: Final = re.compile(r"[0-9A-Fa-f]+")
_SEQUENCER_DIGITS: Final = 16  # int64 nanoseconds in hex: zero-padded, they sort as the times do

_KeyDecoder = Callable[[str], str]


def parse_webhook_body(body: bytes) -> list[Notice]:
    """Notices from one webhook POST body, whose keys are URL-encoded like Go's url.QueryEscape."""
    if not isinstance(body, bytes | bytearray | memoryview):
        raise EventError(f"body must be bytes, got {type(body).__name__}")
    try:
        text = bytes(body).decode("utf-8")
    except UnicodeDecodeError as error:
        raise EventError(f"body is not UTF-8: {error.reason} at byte {error.start}") from None
    try:
        document = json.loads(text)
    except json.JSONDecodeError as error:
        raise EventError(
            f"body is not valid JSON: {error.msg} at line {error.lineno} column {error.colno}"
        ) from None
    except RecursionError:
        raise EventError("body is not a MinIO event: its JSON is nested too deeply") from None
    except ValueError as error:  # e.g. an integer longer than Python converts
        raise EventError(f"body is not usable JSON: {error}") from None
    if not isinstance(document, dict):
        raise EventError(f"top level must be a JSON object with a Records list, got {_kind(document)}")
    return _parse_records(document, _decode_query_escaped)


def parse_listen_event(event: Mapping[str, Any]) -> list[Notice]:
    """Notices from one item of minio-py's listen_bucket_notification, whose keys arrive raw."""
    if not isinstance(event, Mapping):
        raise EventError(f"a listen event must be a mapping with a Records list, got {_kind(event)}")
    return _parse_records(event, _raw_key)


def _parse_records(document: Mapping[str, Any], decode_key: _KeyDecoder) -> list[Notice]:
    records = document.get("Records")
    if records is None and "Records" in document:
        return []  # Go marshals an empty slice as null
    if not isinstance(records, list | tuple):
        found = "missing" if "Records" not in document else _kind(records)
        raise EventError(f"top level must be a JSON object with a Records list; Records is {found}")
    if len(records) > MAX_RECORDS:
        raise EventError(f"{len(records)} records in one body; at most {MAX_RECORDS} records per body")
    return [_parse_record(record, f"Records[{index}]", decode_key) for index, record in enumerate(records)]


def _parse_record(record: Any, where: str, decode_key: _KeyDecoder) -> Notice:
    if not isinstance(record, Mapping):
        raise EventError(f"{where} must be a JSON object, got {_kind(record)}")
    event_name = _required_str(record, where, "eventName")
    if event_name not in UPLOAD_EVENTS:
        # Lenient from here on: a record that is dropped anyway must not block MinIO's queue.
        return Ignored(
            bucket=_lenient_str(record, "s3", "bucket", "name"),
            key=_lenient_key(record, decode_key),
            event_name=event_name,
            reason=f"event {event_name!r} is not an upload",
        )
    user_agent = _optional_str(record, where, "source", "userAgent")
    if REACTOR_USER_AGENT_MARK in user_agent:
        return Ignored(
            bucket=_lenient_str(record, "s3", "bucket", "name"),
            key=_lenient_key(record, decode_key),
            event_name=event_name,
            reason="the reactor's own write",
        )
    bucket = _required_str(record, where, "s3", "bucket", "name")
    if not bucket:
        raise EventError(f"{where}.s3.bucket.name is empty")
    raw_key = _required_str(record, where, "s3", "object", "key")
    try:
        key = decode_key(raw_key)
    except UnicodeDecodeError:
        raise EventError(
            f"{where}.s3.object.key {_show(raw_key)} has percent-escapes that do not decode to UTF-8"
        ) from None
    if not key:
        raise EventError(f"{where}.s3.object.key is empty")
    if not _is_utf8(key):
        raise EventError(f"{where}.s3.object.key {_show(key)} holds a lone surrogate, which no S3 key can")
    if "\x00" in key:
        raise EventError(f"{where}.s3.object.key {_show(key)} holds a NUL character, which no S3 key can")
    _check_length(key, MAX_KEY_BYTES, f"{where}.s3.object.key")
    etag = _required_str(record, where, "s3", "object", "eTag").strip('"')
    if not etag:
        raise EventError(f"{where}.s3.object.eTag is empty")
    _check_length(etag, MAX_ETAG_BYTES, f"{where}.s3.object.eTag")
    size = _required_int(record, where, "s3", "object", "size")
    if size < 0:
        raise EventError(f"{where}.s3.object.size must be >= 0, got {_show(size)}")
    if size > MAX_SIZE:
        raise EventError(f"{where}.s3.object.size must be at most 2**63-1 (int64), got {_show(size)}")
    version_id = _optional_str(record, where, "s3", "object", "versionId")
    if version_id == "null":
        version_id = ""  # what MinIO reports for an unversioned object
    _check_length(version_id, MAX_VERSION_ID_BYTES, f"{where}.s3.object.versionId")
    _check_storable(record, where)
    return Upload(
        bucket=bucket,
        key=key,
        etag=etag,
        size=size,
        version_id=version_id,
        sequencer=_sequencer(record, where),
        event_name=event_name,
        event_time=_optional_str(record, where, "eventTime"),
        user_agent=user_agent,
        raw=record,
    )


def _sequencer(record: Mapping[str, Any], where: str) -> str:
    value = _optional_str(record, where, "s3", "object", "sequencer")
    if not value:
        return ""
    if not _HEX_RE.fullmatch(value):
        raise EventError(f"{where}.s3.object.sequencer must be hexadecimal, got {_show(value)}")
    digits = value.upper().lstrip("0").rjust(_SEQUENCER_DIGITS, "0")
    if len(digits) > _SEQUENCER_DIGITS:
        raise EventError(
            f"{where}.s3.object.sequencer must be at most {_SEQUENCER_DIGITS} hex digits, got {_show(value)}"
        )
    return digits


def _check_length(text: str, limit: int, path: str) -> None:
    """EventError when text is longer than limit bytes in UTF-8, or is not UTF-8 at all."""
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError:
        raise EventError(f"{path} holds a lone surrogate, which is not UTF-8") from None
    if size > limit:
        raise EventError(f"{path} is {size} bytes long; MinIO never sends more than {limit} bytes there")


def _check_storable(record: Mapping[str, Any], where: str) -> None:
    """EventError naming the first value in the record that JSON in PostgreSQL cannot hold: a string
    (or member name) with a NUL or a lone surrogate, or a float that is not finite (Python's json reads
    NaN, Infinity and 1e999; JSON and jsonb have none of them). One C-speed serialisation tells whether
    the record is fine; only a suspect one is walked, to name the culprit."""
    try:
        text = json.dumps(dict(record), ensure_ascii=False, allow_nan=False)
    except (ValueError, TypeError, RecursionError) as error:
        _find_unstorable(record, where)
        raise EventError(f"{where} cannot be written as JSON: {error}") from None
    # NUL is always written as an escape; a lone surrogate stays as it is and does not encode.
    if "\\u0000" in text or not _is_utf8(text):
        _find_unstorable(record, where)  # a backslash before "u0000" in some string is fine after all


def _find_unstorable(record: Mapping[str, Any], where: str) -> None:
    """The walk behind _check_storable. It uses an explicit stack, as the record may be nested as deeply
    as the JSON parser allowed, and visits each container once: a mapping handed to parse_listen_event
    may share parts, or even hold itself (which serialising then refuses)."""
    stack: list[tuple[str, Any]] = [(where, record)]
    seen: set[int] = set()
    while stack:
        path, value = stack.pop()
        if isinstance(value, str):
            _check_text(value, path)
        elif isinstance(value, float) and not math.isfinite(value):
            raise EventError(f"{path} is {value!r}, which is not a JSON number")
        elif value is None or isinstance(value, bool | int | float) or id(value) in seen:
            continue
        elif isinstance(value, Mapping):
            seen.add(id(value))
            for name, item in value.items():
                if not isinstance(name, str):
                    raise EventError(f"{path} has a member name that is {_kind(name)}, not a string")
                _check_text(name, f"{path} member name {_show(name)}")
                stack.append((f"{path}.{name}", item))
        elif isinstance(value, list | tuple):
            seen.add(id(value))
            stack.extend((f"{path}[{index}]", item) for index, item in enumerate(value))
        else:
            raise EventError(f"{path} is {_kind(value)}, which is not a JSON value")


def _check_text(text: str, path: str) -> None:
    if "\x00" in text:
        raise EventError(f"{path} holds a NUL character, which MinIO never sends and PostgreSQL cannot store")
    if not _is_utf8(text):
        raise EventError(f"{path} holds a lone surrogate, which is not UTF-8")


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _decode_query_escaped(key: str) -> str:
    return urllib.parse.unquote_plus(key, errors="strict")


def _raw_key(key: str) -> str:
    return key


_MISSING: Final = object()


def _lookup(record: Mapping[str, Any], where: str, keys: tuple[str, ...]) -> Any:
    """The value at keys inside record, or _MISSING; EventError if something on the way is not an object."""
    value: Any = record
    path = where
    for key in keys:
        if not isinstance(value, Mapping):
            raise EventError(f"{path} must be a JSON object, got {_kind(value)}")
        value = value.get(key, _MISSING)
        path = f"{path}.{key}"
        if value is _MISSING:
            break
    return value


def _present(record: Mapping[str, Any], where: str, keys: tuple[str, ...]) -> Any:
    """The value at keys, or None when it is missing or null."""
    value = _lookup(record, where, keys)
    return None if value is _MISSING else value


def _required_str(record: Mapping[str, Any], where: str, *keys: str) -> str:
    value = _present(record, where, keys)
    if value is None:
        raise EventError(f"{_path(where, keys)} is missing")
    if not isinstance(value, str):
        raise EventError(f"{_path(where, keys)} must be a string, got {_show(value)}")
    return value


def _optional_str(record: Mapping[str, Any], where: str, *keys: str) -> str:
    """The string at keys, or "" when it is missing or null."""
    value = _present(record, where, keys)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise EventError(f"{_path(where, keys)} must be a string, got {_show(value)}")
    return value


def _required_int(record: Mapping[str, Any], where: str, *keys: str) -> int:
    value = _present(record, where, keys)
    if value is None:
        raise EventError(f"{_path(where, keys)} is missing")
    # bool is an int subclass in Python, but true is never a size in JSON.
    if not isinstance(value, int) or isinstance(value, bool):
        raise EventError(f"{_path(where, keys)} must be an integer, got {_show(value)}")
    return value


def _path(where: str, keys: tuple[str, ...]) -> str:
    return ".".join((where, *keys))


def _lenient_str(record: Mapping[str, Any], *keys: str) -> str:
    value: Any = record
    for key in keys:
        if not isinstance(value, Mapping):
            return ""
        value = value.get(key)
    if isinstance(value, str):
        return value
    return ""


def _lenient_key(record: Mapping[str, Any], decode_key: _KeyDecoder) -> str:
    key = _lenient_str(record, "s3", "object", "key")
    try:
        return decode_key(key)
    except UnicodeDecodeError:
        return key


def _kind(value: object) -> str:
    """The JSON name of a value's type, for messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list | tuple):
        return "an array"
    if isinstance(value, Mapping):
        return "an object"
    return type(value).__name__


def _show(value: object) -> str:
    """A short rendering of a value for messages; containers are named, not dumped."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str | int | float):
        try:
            shown = repr(value)
        except ValueError:  # an integer too long for Python to print
            return "a number too long to show"
        return shown if len(shown) <= 80 else f"{shown[:77]}..."
    return _kind(value)
