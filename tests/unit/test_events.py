"""Parsing MinIO notifications: webhook bodies (encoded keys) and listen events (raw keys)."""

from __future__ import annotations

import copy
import json
import random
import unicodedata
import urllib.parse
from collections.abc import Callable
from typing import Any

import pytest

from reactor.domain import Ignored, Notice, Upload
from reactor.errors import EventError
from reactor.events import (
    MAX_RECORDS,
    REACTOR_USER_AGENT_MARK,
    UPLOAD_EVENTS,
    parse_listen_event,
    parse_webhook_body,
)

KEY = "detect/测试10/frame 001+a.jpg"
# As MinIO's webhook target sends it: Go's url.QueryEscape, written out by hand so the fixture does not
# depend on the helper below.
ENCODED_KEY = "detect%2F%E6%B5%8B%E8%AF%9510%2Fframe+001%2Ba.jpg"

RECORD: dict[str, Any] = {
    "eventVersion": "2.0",
    "eventSource": "minio:s3",
    "awsRegion": "",
    "eventTime": "2025-11-06T09:17:17.161Z",
    "eventName": "s3:ObjectCreated:Put",
    "userIdentity": {"principalId": "minioadmin"},
    "requestParameters": {"principalId": "minioadmin", "region": "", "sourceIPAddress": "127.0.0.1"},
    "responseElements": {
        "x-amz-id-2": "dd9025bab4ad464b049177c95eb6ebf374d3b3fd1af9251148b658df7ac2e3e8",
        "x-amz-request-id": "18757F6A3C5C2E0B",
        "x-minio-deployment-id": "5d2b8e2c-4a0b-4d4c-9a2e-6f0d3c1b7a11",
        "x-minio-origin-endpoint": "http://127.0.0.1:9000",
    },
    "s3": {
        "s3SchemaVersion": "1.0",
        "configurationId": "Config",
        "bucket": {
            "name": "images",
            "ownerIdentity": {"principalId": "minioadmin"},
            "arn": "arn:aws:s3:::images",
        },
        "object": {
            "key": ENCODED_KEY,
            "size": 48213,
            "eTag": "9b2cf535f27731c974343645a3985328",
            "contentType": "image/jpeg",
            "userMetadata": {"content-type": "image/jpeg"},
            "versionId": "",
            "sequencer": "18757F6A3C7D1B2E",
        },
    },
    "source": {
        "host": "127.0.0.1",
        "port": "",
        "userAgent": "MinIO (linux; amd64) minio-go/v7.0.95 mc/RELEASE.2025-08-13T08-35-41Z",
    },
}

MISSING = object()


def go_query_escape(key: str) -> str:
    """What Go's url.QueryEscape makes of a key: only unreserved characters stay, space becomes '+'."""
    return urllib.parse.quote_plus(key, safe="")


def record(*, encoded: bool = True, key: str = KEY, **changes: Any) -> dict[str, Any]:
    """The sample record with changes at dotted paths (``s3.object.size=5``); MISSING deletes the path."""
    result = copy.deepcopy(RECORD)
    result["s3"]["object"]["key"] = go_query_escape(key) if encoded else key
    for dotted, value in changes.items():
        *parents, last = dotted.split("__")
        target = result
        for part in parents:
            target = target[part]
        if value is MISSING:
            del target[last]
        else:
            target[last] = value
    return result


def body(*records: Any, event_name: str = "s3:ObjectCreated:Put", **top: Any) -> bytes:
    document: dict[str, Any] = {"EventName": event_name, "Key": f"images/{KEY}", "Records": list(records)}
    document.update(top)
    return json.dumps(document).encode()


def webhook_one(rec: Any) -> Any:
    (notice,) = parse_webhook_body(body(rec))
    return notice


def listen_one(rec: Any) -> Any:
    (notice,) = parse_listen_event({"Records": [rec]})
    return notice


PARSERS: dict[str, Callable[[Any], list[Notice]]] = {
    "webhook": lambda rec: parse_webhook_body(body(rec)),
    "listen": lambda rec: parse_listen_event({"Records": [rec]}),
}


def webhook_error(data: bytes) -> str:
    with pytest.raises(EventError) as caught:
        parse_webhook_body(data)
    return str(caught.value)


# --- the realistic record ------------------------------------------------------------------------


def test_sample_encoding_matches_go_query_escape() -> None:
    # The hand-written fixture and the helper agree, so the helper may build the other cases.
    assert go_query_escape(KEY) == ENCODED_KEY


def test_webhook_upload_is_parsed_in_full() -> None:
    # Given the body MinIO's webhook target posts for one PUT
    data = json.dumps({"EventName": "s3:ObjectCreated:Put", "Key": f"images/{KEY}", "Records": [RECORD]})
    # When parsed
    notices = parse_webhook_body(data.encode())
    # Then one Upload carries every field, with the key decoded
    assert notices == [
        Upload(
            bucket="images",
            key=KEY,
            etag="9b2cf535f27731c974343645a3985328",
            size=48213,
            version_id="",
            sequencer="18757F6A3C7D1B2E",
            event_name="s3:ObjectCreated:Put",
            event_time="2025-11-06T09:17:17.161Z",
            user_agent="MinIO (linux; amd64) minio-go/v7.0.95 mc/RELEASE.2025-08-13T08-35-41Z",
        )
    ]
    upload = notices[0]
    assert isinstance(upload, Upload)
    assert upload.raw == RECORD
    assert not upload.is_multipart


@pytest.mark.parametrize("event_name", sorted(UPLOAD_EVENTS))
def test_every_upload_event_is_an_upload(event_name: str) -> None:
    # Given each upload event name / When parsed / Then it is an Upload with that name
    notice = webhook_one(record(eventName=event_name))
    assert isinstance(notice, Upload)
    assert notice.event_name == event_name


def test_upload_events_are_the_four_documented_ones() -> None:
    assert (
        frozenset(
            {
                "s3:ObjectCreated:Put",
                "s3:ObjectCreated:Post",
                "s3:ObjectCreated:CompleteMultipartUpload",
                "s3:ObjectCreated:Copy",
            }
        )
        == UPLOAD_EVENTS
    )


def test_bytearray_and_memoryview_bodies_are_accepted() -> None:
    data = body(record())
    # The signature says bytes; a server framework may still hand over a buffer.
    from_bytearray = parse_webhook_body(bytearray(data))  # type: ignore[arg-type]
    from_memoryview = parse_webhook_body(memoryview(data))  # type: ignore[arg-type]
    assert from_bytearray == from_memoryview == parse_webhook_body(data)


def test_records_keep_their_order_and_can_mix_uploads_and_ignored() -> None:
    # Given a body with an upload, a tagging event and another upload
    data = body(record(key="a"), record(key="b", eventName="s3:ObjectCreated:PutTagging"), record(key="c"))
    # When parsed / Then one notice per record, in order
    notices = parse_webhook_body(data)
    assert [(type(n).__name__, n.key) for n in notices] == [
        ("Upload", "a"),
        ("Ignored", "b"),
        ("Upload", "c"),
    ]


# --- keys: webhook decodes, listen keeps raw ---------------------------------------------------

NFC = unicodedata.normalize("NFC", "café/é.jpg")
NFD = unicodedata.normalize("NFD", "café/é.jpg")

KEYS = [
    "plain/key.jpg",
    "with space/a b.jpg",
    "plus+sign/a+b.jpg",
    "percent%/100%.jpg",
    "literal%41/x%2Fy.jpg",
    "测试10/帧 1.jpg",
    "deep/a/b/c/d/e/f/g.jpg",
    "symbols/!$&'()*,;=:@[]~-_.jpg",
    "emoji/🙂.png",
    NFC,
    NFD,
]


@pytest.mark.parametrize("key", KEYS)
def test_webhook_keys_are_decoded_exactly(key: str) -> None:
    # Given a key sent QueryEscape-encoded by the webhook target
    # When parsed / Then the original key comes back byte for byte
    notice = webhook_one(record(key=key))
    assert notice.key == key


@pytest.mark.parametrize("key", KEYS)
def test_listen_keys_are_never_decoded(key: str) -> None:
    # Given the same key as listen_bucket_notification delivers it (raw)
    # When parsed / Then it is kept as is: a '+' or '%41' stays
    notice = listen_one(record(key=key, encoded=False))
    assert notice.key == key


@pytest.mark.parametrize(
    ("encoded", "webhook_key", "listen_key"),
    [
        ("a+b", "a b", "a+b"),
        ("a%2Bb", "a+b", "a%2Bb"),
        ("a%2541", "a%41", "a%2541"),
        ("%41", "A", "%41"),
        ("x%2Fy", "x/y", "x%2Fy"),
        ("%E6%B5%8B%E8%AF%9510", "测试10", "%E6%B5%8B%E8%AF%9510"),
        ("100%", "100%", "100%"),
    ],
)
def test_same_key_text_means_different_keys_on_each_path(
    encoded: str, webhook_key: str, listen_key: str
) -> None:
    # Given one key string in a record
    rec = record(key=encoded, encoded=False)
    # When parsed as a webhook body and as a listen event
    # Then only the webhook decodes it
    assert webhook_one(rec).key == webhook_key
    assert listen_one(rec).key == listen_key


def test_nfc_and_nfd_keys_stay_different() -> None:
    # Given the same-looking key in NFC and NFD
    assert NFC != NFD
    # When parsed on both paths / Then neither is normalised
    assert webhook_one(record(key=NFC)).key == NFC
    assert webhook_one(record(key=NFD)).key == NFD
    assert listen_one(record(key=NFD, encoded=False)).key == NFD


def test_listen_event_keeps_the_raw_record() -> None:
    rec = record(key="a+b", encoded=False)
    notice = listen_one(rec)
    assert isinstance(notice, Upload)
    assert notice.raw is rec


# --- ignored records -----------------------------------------------------------------------------

NOT_UPLOADS = [
    "s3:ObjectCreated:PutRetention",
    "s3:ObjectCreated:PutLegalHold",
    "s3:ObjectCreated:PutTagging",
    "s3:ObjectCreated:DeleteTagging",
    "s3:ObjectRemoved:Delete",
    "s3:ObjectRemoved:DeleteMarkerCreated",
    "s3:ObjectAccessed:Get",
    "s3:ObjectAccessed:Head",
    "s3:ObjectRestore:Completed",
    "s3:Replication:OperationFailedReplication",
    "s3:ObjectTransition:Complete",
    "s3:Scanner:ManyVersions",
    "",
]


@pytest.mark.parametrize("event_name", NOT_UPLOADS)
def test_non_upload_events_are_ignored_with_the_event_name(event_name: str) -> None:
    # Given a record for something other than an upload
    rec = record(eventName=event_name, key="a b/c.jpg")
    # When parsed
    notice = webhook_one(rec)
    # Then it is Ignored, naming the event, with bucket and decoded key
    assert notice == Ignored(
        bucket="images",
        key="a b/c.jpg",
        event_name=event_name,
        reason=f"event {event_name!r} is not an upload",
    )


def test_removed_event_without_etag_or_size_is_ignored_not_an_error() -> None:
    # Given a delete record as MinIO sends it: no eTag, size or metadata
    rec = record(eventName="s3:ObjectRemoved:Delete")
    for field in ("eTag", "size", "contentType", "userMetadata"):
        del rec["s3"]["object"][field]
    # When parsed / Then it is simply ignored
    notice = webhook_one(rec)
    assert isinstance(notice, Ignored)
    assert notice.key == KEY


@pytest.mark.parametrize(
    "broken",
    [
        {"s3": None},
        {"s3": {"bucket": 5, "object": []}},
        {"s3": {"bucket": {"name": None}, "object": {"key": 7}}},
    ],
)
def test_ignored_record_with_odd_shape_does_not_block_the_queue(broken: dict[str, Any]) -> None:
    # Given a non-upload record whose s3 part is odd
    rec = {"eventName": "s3:ObjectRemoved:Delete", **broken}
    # When parsed / Then it is still Ignored (an error would make MinIO resend it forever)
    notice = webhook_one(rec)
    assert notice == Ignored(
        bucket="",
        key="",
        event_name="s3:ObjectRemoved:Delete",
        reason="event 's3:ObjectRemoved:Delete' is not an upload",
    )


@pytest.mark.parametrize(
    "user_agent",
    [
        f"MinIO (linux; amd64) minio-py/7.2.20 {REACTOR_USER_AGENT_MARK}/0.1.0",
        f"{REACTOR_USER_AGENT_MARK}/1.0",
    ],
)
@pytest.mark.parametrize("parse", [webhook_one, listen_one])
def test_the_reactors_own_writes_are_ignored(user_agent: str, parse: Any) -> None:
    # Given the Copy event raised by the reactor's own server-side copy
    rec = record(eventName="s3:ObjectCreated:Copy", source__userAgent=user_agent, key="alerts/x.jpg")
    # When parsed / Then it is Ignored as the reactor's own write
    notice = parse(rec)
    assert isinstance(notice, Ignored)
    assert notice.reason == "the reactor's own write"
    assert notice.bucket == "images"
    assert notice.event_name == "s3:ObjectCreated:Copy"


def test_own_write_mark_is_the_documented_one() -> None:
    assert REACTOR_USER_AGENT_MARK == "reactor-mover"


@pytest.mark.parametrize("user_agent", [MISSING, None, "", "mc/RELEASE.2025", "Reactor-Mover"])
def test_other_user_agents_are_uploads(user_agent: Any) -> None:
    # Given uploads by other clients (or with no user agent) / Then they are Uploads
    notice = webhook_one(record(source__userAgent=user_agent))
    assert isinstance(notice, Upload)
    assert notice.user_agent == (user_agent if isinstance(user_agent, str) else "")


def test_missing_source_is_fine() -> None:
    notice = webhook_one(record(source=MISSING))
    assert isinstance(notice, Upload)
    assert notice.user_agent == ""


# --- field normalisation -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("etag", "expected"),
    [
        ("9b2cf535f27731c974343645a3985328", "9b2cf535f27731c974343645a3985328"),
        ('"9b2cf535f27731c974343645a3985328"', "9b2cf535f27731c974343645a3985328"),
        ('""9b2cf535f27731c974343645a3985328""', "9b2cf535f27731c974343645a3985328"),
        ("d41d8cd98f00b204e9800998ecf8427e-3", "d41d8cd98f00b204e9800998ecf8427e-3"),
        ('"d41d8cd98f00b204e9800998ecf8427e-12"', "d41d8cd98f00b204e9800998ecf8427e-12"),
    ],
)
def test_etag_loses_surrounding_quotes(etag: str, expected: str) -> None:
    # Given an eTag with or without (doubled) quotes / When parsed / Then the bare value remains
    notice = webhook_one(record(s3__object__eTag=etag))
    assert notice.etag == expected
    assert notice.is_multipart == ("-" in expected)


@pytest.mark.parametrize(
    ("version_id", "expected"),
    [
        (MISSING, ""),
        (None, ""),
        ("", ""),
        ("null", ""),
        ("3f2a4e5c-1b2d-4e6f-9a8b-7c6d5e4f3a2b", "3f2a4e5c-1b2d-4e6f-9a8b-7c6d5e4f3a2b"),
    ],
)
def test_version_id_is_empty_when_unversioned(version_id: Any, expected: str) -> None:
    assert webhook_one(record(s3__object__versionId=version_id)).version_id == expected


@pytest.mark.parametrize(
    ("sequencer", "expected"),
    [
        ("18757F6A3C7D1B2E", "18757F6A3C7D1B2E"),
        ("18757f6a3c7d1b2e", "18757F6A3C7D1B2E"),
        ("abc", "0000000000000ABC"),
        ("0", "0000000000000000"),
        ("000018757F6A3C7D1B2E", "18757F6A3C7D1B2E"),
        ("", ""),
        (None, ""),
        (MISSING, ""),
    ],
)
def test_sequencer_is_upper_case_and_padded(sequencer: Any, expected: str) -> None:
    # Given a sequencer in any case or length / When parsed / Then it sorts as the times it encodes
    assert webhook_one(record(s3__object__sequencer=sequencer)).sequencer == expected


def test_padded_sequencers_sort_like_their_numbers() -> None:
    small = webhook_one(record(s3__object__sequencer="FFF")).sequencer
    large = webhook_one(record(s3__object__sequencer="1000")).sequencer
    assert small < large


@pytest.mark.parametrize("event_time", [MISSING, None])
def test_event_time_is_optional(event_time: Any) -> None:
    assert webhook_one(record(eventTime=event_time)).event_time == ""


@pytest.mark.parametrize("size", [0, 1, 5 * 1024**4])
def test_sizes(size: int) -> None:
    assert webhook_one(record(s3__object__size=size)).size == size


# --- empty and test bodies -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        b'{"Records": []}',
        b'{"EventName": "s3:TestEvent", "Key": "", "Records": []}',
        b'{"EventName": "", "Key": "", "Records": null}',
        b' \n{"Records": []}\n',
    ],
)
def test_bodies_without_records_are_valid_and_empty(data: bytes) -> None:
    # Given a body with no records (MinIO's setup probe, or Go's nil slice) / Then nothing to do
    assert parse_webhook_body(data) == []


@pytest.mark.parametrize("event", [{"Records": []}, {"Records": None}, {"Records": ()}])
def test_listen_events_without_records_are_empty(event: dict[str, Any]) -> None:
    assert parse_listen_event(event) == []


def test_the_record_limit_is_inclusive() -> None:
    # Given exactly the limit of (ignored) records / Then they parse; one more is refused
    ignorable = {"eventName": "s3:ObjectAccessed:Get"}
    assert len(parse_webhook_body(body(*[ignorable] * MAX_RECORDS))) == MAX_RECORDS
    assert MAX_RECORDS == 10_000
    message = webhook_error(body(*[ignorable] * (MAX_RECORDS + 1)))
    assert "at most 10000 records per body" in message


# --- malformed input: EventError and nothing else ------------------------------------------------

BAD_BODIES = [
    pytest.param(b"", "body is not valid JSON: Expecting value at line 1 column 1", id="empty"),
    pytest.param(b"not json", "body is not valid JSON: Expecting value at line 1 column 1", id="text"),
    pytest.param(b'{"Records": [', "body is not valid JSON", id="truncated"),
    pytest.param(b'{"Records": []}{}', "body is not valid JSON: Extra data at line 1 column 16", id="extra"),
    pytest.param(b"\xff\xfe{}", "body is not UTF-8", id="not-utf8"),
    pytest.param('{"Records": []}'.encode("utf-16"), "body is not UTF-8", id="utf16"),
    pytest.param(b"\xef\xbb\xbf{}", "body is not valid JSON", id="bom"),
    pytest.param(b'{"Records": [' + b"9" * 5000 + b"]}", "body is not usable JSON", id="huge-int"),
    pytest.param(b"[]", "top level must be a JSON object with a Records list, got an array", id="array"),
    pytest.param(b"null", "top level must be a JSON object with a Records list, got null", id="null"),
    pytest.param(b'"x"', "got a string", id="string"),
    pytest.param(b"42", "got a number", id="number"),
    pytest.param(
        b"{}", "top level must be a JSON object with a Records list; Records is missing", id="no-records"
    ),
    pytest.param(b'{"records": []}', "Records is missing", id="lower-case-records"),
    pytest.param(b'{"Records": {}}', "Records is an object", id="records-object"),
    pytest.param(b'{"Records": "x"}', "Records is a string", id="records-string"),
    pytest.param(b'{"Records": [1]}', "Records[0] must be a JSON object, got a number", id="record-number"),
    pytest.param(b'{"Records": [null]}', "Records[0] must be a JSON object, got null", id="record-null"),
    pytest.param(b'{"Records": [[]]}', "Records[0] must be a JSON object, got an array", id="record-array"),
    pytest.param(b'{"Records": [{}]}', "Records[0].eventName is missing", id="no-event-name"),
    pytest.param(
        b'{"Records": [{"eventName": 5}]}',
        "Records[0].eventName must be a string, got 5",
        id="event-name-int",
    ),
]


@pytest.mark.parametrize(("data", "message"), BAD_BODIES)
def test_malformed_bodies_raise_event_error_saying_what_and_where(data: bytes, message: str) -> None:
    # Given a body that is not a MinIO event / When parsed / Then EventError says what is wrong
    assert message in webhook_error(data)


BAD_RECORDS = [
    pytest.param({"s3": MISSING}, "Records[0].s3.bucket.name is missing", id="no-s3"),
    pytest.param({"s3": []}, "Records[0].s3 must be a JSON object, got an array", id="s3-array"),
    pytest.param({"s3": None}, "Records[0].s3 must be a JSON object, got null", id="s3-null"),
    pytest.param(
        {"s3__bucket": "images"}, "Records[0].s3.bucket must be a JSON object, got a string", id="bucket-str"
    ),
    pytest.param({"s3__bucket__name": MISSING}, "Records[0].s3.bucket.name is missing", id="no-bucket"),
    pytest.param(
        {"s3__bucket__name": 1}, "Records[0].s3.bucket.name must be a string, got 1", id="bucket-int"
    ),
    pytest.param({"s3__bucket__name": ""}, "Records[0].s3.bucket.name is empty", id="bucket-empty"),
    pytest.param({"s3__object": MISSING}, "Records[0].s3.object.key is missing", id="no-object"),
    pytest.param(
        {"s3__object": 3}, "Records[0].s3.object must be a JSON object, got a number", id="object-int"
    ),
    pytest.param({"s3__object__key": MISSING}, "Records[0].s3.object.key is missing", id="no-key"),
    pytest.param({"s3__object__key": None}, "Records[0].s3.object.key is missing", id="key-null"),
    pytest.param(
        {"s3__object__key": ["a"]}, "Records[0].s3.object.key must be a string, got an array", id="key-list"
    ),
    pytest.param({"s3__object__key": ""}, "Records[0].s3.object.key is empty", id="key-empty"),
    pytest.param({"s3__object__key": "\ud800x"}, "holds a lone surrogate", id="key-lone-surrogate"),
    pytest.param({"s3__object__eTag": MISSING}, "Records[0].s3.object.eTag is missing", id="no-etag"),
    pytest.param(
        {"s3__object__eTag": 12}, "Records[0].s3.object.eTag must be a string, got 12", id="etag-int"
    ),
    pytest.param({"s3__object__eTag": '""'}, "Records[0].s3.object.eTag is empty", id="etag-only-quotes"),
    pytest.param({"s3__object__size": MISSING}, "Records[0].s3.object.size is missing", id="no-size"),
    pytest.param(
        {"s3__object__size": "abc"}, "Records[0].s3.object.size must be an integer, got 'abc'", id="size-str"
    ),
    pytest.param({"s3__object__size": "12"}, "size must be an integer, got '12'", id="size-numeric-str"),
    pytest.param({"s3__object__size": True}, "size must be an integer, got true", id="size-bool"),
    pytest.param({"s3__object__size": 1.5}, "size must be an integer, got 1.5", id="size-float"),
    pytest.param({"s3__object__size": float("nan")}, "size must be an integer, got nan", id="size-nan"),
    pytest.param(
        {"s3__object__size": -1}, "Records[0].s3.object.size must be >= 0, got -1", id="size-negative"
    ),
    pytest.param({"s3__object__size": {}}, "size must be an integer, got an object", id="size-object"),
    pytest.param(
        {"s3__object__versionId": 3}, "Records[0].s3.object.versionId must be a string", id="version-int"
    ),
    pytest.param(
        {"s3__object__sequencer": 5}, "Records[0].s3.object.sequencer must be a string", id="seq-int"
    ),
    pytest.param(
        {"s3__object__sequencer": "18757G"}, "sequencer must be hexadecimal, got '18757G'", id="seq-not-hex"
    ),
    pytest.param({"s3__object__sequencer": "0x1F"}, "sequencer must be hexadecimal", id="seq-0x"),
    pytest.param(
        {"s3__object__sequencer": "\uff11\uff12"}, "sequencer must be hexadecimal", id="seq-fullwidth"
    ),
    pytest.param({"s3__object__sequencer": "1" * 17}, "at most 16 hex digits", id="seq-too-long"),
    pytest.param({"eventTime": 1}, "Records[0].eventTime must be a string, got 1", id="time-int"),
    pytest.param({"source": "mc"}, "Records[0].source must be a JSON object, got a string", id="source-str"),
    pytest.param({"source__userAgent": 1}, "Records[0].source.userAgent must be a string", id="agent-int"),
]


@pytest.mark.parametrize(("changes", "message"), BAD_RECORDS)
@pytest.mark.parametrize("path", ["webhook", "listen"])
def test_malformed_upload_records_name_the_path(changes: dict[str, Any], message: str, path: str) -> None:
    # Given an upload record with one field wrong
    rec = record(encoded=path == "webhook", **changes)
    # When parsed on either path
    with pytest.raises(EventError) as caught:
        PARSERS[path](rec)
    # Then EventError names where and what
    assert message in str(caught.value)


def test_webhook_key_whose_escapes_are_not_utf8_is_an_event_error() -> None:
    # Given a webhook key whose percent-escapes are not UTF-8 / Then EventError, not a silent U+FFFD
    rec = record(s3__object__key="a%FF%FEb")
    assert webhook_error(body(rec)) == (
        "Records[0].s3.object.key 'a%FF%FEb' has percent-escapes that do not decode to UTF-8"
    )
    # And the same text on the listen path is a raw key, kept as is
    assert listen_one(rec).key == "a%FF%FEb"


def test_error_index_points_at_the_bad_record() -> None:
    # Given a good record followed by a bad one / Then the error names Records[1]
    message = webhook_error(body(record(), record(s3__object__eTag=MISSING)))
    assert message == "Records[1].s3.object.eTag is missing"


def test_deeply_nested_json_is_an_event_error() -> None:
    # Given 100,000 nested lists (the JSON decoder's recursion limit) / Then EventError, not RecursionError
    assert "nested too deeply" in webhook_error(b"[" * 100_000 + b"]" * 100_000)
    assert "nested too deeply" in webhook_error(b'{"Records": [' + b"[" * 100_000 + b"]" * 100_000 + b"]}")


def test_deep_nesting_inside_a_field_we_do_not_read_is_fine() -> None:
    # Given userMetadata nested a little deep (within the decoder's limit) / Then the upload parses
    nested: Any = "x"
    for _ in range(200):
        nested = {"a": nested}
    assert isinstance(webhook_one(record(s3__object__userMetadata=nested)), Upload)


@pytest.mark.parametrize("event", [None, [], "Records", 5, b"{}"])
def test_listen_event_that_is_not_a_mapping_is_an_event_error(event: Any) -> None:
    with pytest.raises(EventError, match="a listen event must be a mapping with a Records list"):
        parse_listen_event(event)


@pytest.mark.parametrize("data", ["{}", None, 5])
def test_webhook_body_that_is_not_bytes_is_an_event_error(data: Any) -> None:
    with pytest.raises(EventError, match="body must be bytes"):
        parse_webhook_body(data)


def _mutations(seed: int, count: int) -> list[bytes]:
    """Bodies made by flipping, deleting, duplicating and splicing bytes of a valid body."""
    rng = random.Random(seed)
    valid = body(record(), record(eventName="s3:ObjectRemoved:Delete"))
    tokens = [
        b"{",
        b"}",
        b"[",
        b"]",
        b'"',
        b":",
        b",",
        b"null",
        b"true",
        b"-1",
        b"1e999",
        b"\\u",
        b"\xff",
        b"%",
    ]
    results = []
    for _ in range(count):
        data = bytearray(valid)
        for _ in range(rng.randint(1, 4)):
            at = rng.randrange(len(data))
            choice = rng.randrange(4)
            if choice == 0:
                data[at] = rng.randrange(256)
            elif choice == 1:
                del data[at : at + rng.randint(1, 20)]
            elif choice == 2:
                data[at:at] = rng.choice(tokens)
            else:
                data[at:at] = data[rng.randrange(len(data)) :][: rng.randint(1, 40)]
        results.append(bytes(data))
    results.extend(rng.randbytes(rng.randint(0, 64)) for _ in range(200))
    return results


@pytest.mark.parametrize("seed", range(5))
def test_fuzzed_bodies_give_notices_or_event_error_only(seed: int) -> None:
    # Given thousands of corrupted and random bodies
    for data in _mutations(seed, 1_000):
        # When parsed / Then the result is a list of notices or an EventError, never anything else
        try:
            notices = parse_webhook_body(data)
        except EventError:
            continue
        assert all(isinstance(notice, Upload | Ignored) for notice in notices)


@pytest.mark.parametrize("seed", range(3))
def test_fuzzed_listen_events_give_notices_or_event_error_only(seed: int) -> None:
    # Given records whose values are swapped for random JSON-ish values
    rng = random.Random(seed)
    values: list[Any] = [None, True, 0, -5, 1.5, "", "x", "%FF", [], {}, [1], {"a": 1}, "null", "ABC"]
    paths = ["eventName", "s3", "s3__bucket", "s3__bucket__name", "s3__object", "s3__object__key",
             "s3__object__eTag", "s3__object__size", "s3__object__versionId", "s3__object__sequencer",
             "eventTime", "source", "source__userAgent"]  # fmt: skip
    for _ in range(2_000):
        changes = {}
        for path in rng.sample(paths, rng.randint(1, 3)):
            changes[path] = rng.choice([*values, MISSING])
        try:
            rec = record(encoded=False, **changes)
        except (KeyError, TypeError):
            continue  # an earlier change removed or replaced a parent of this path
        try:
            parse_listen_event({"Records": [rec]})
        except EventError:
            continue
