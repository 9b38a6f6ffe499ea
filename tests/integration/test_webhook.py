"""The webhook's contract with MinIO's queue, on a real reactor process and a real database."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import pytest

from tests.support.e2e import history, post, sql, webhook_body, write_rules
from tests.support.stack import BucketNames, MinioStack, ReactorProcess, ReactorSpawner

ETAG = "0123456789abcdef0123456789abcdef"


@pytest.fixture
def reactor(
    tmp_path: Path, database_url: str, buckets: BucketNames, spawn_reactor: ReactorSpawner
) -> tuple[ReactorProcess, str]:
    src, dst = buckets("img"), buckets("alr")
    rules = write_rules(
        tmp_path / "rules.toml",
        {
            "name": "alerts",
            "source_bucket": src,
            "pattern": "{task_type}/{task_id}/{filename}",
            "target_bucket": dst,
            "target": "{task_type}/{task_id}/{filename}",
            "order_key": "{task_id}",
        },
    )
    return spawn_reactor(database_url=database_url, rules_path=rules), src


def moves(database_url: str) -> int:
    return int(sql(database_url, "SELECT count(*) AS n FROM reactor.moves")[0]["n"])


def test_a_matching_upload_is_committed_before_the_2xx(
    reactor: tuple[ReactorProcess, str], database_url: str, minio: MinioStack
) -> None:
    process, src = reactor
    body = webhook_body(bucket=src, key="det/t1/a b+c.jpg", etag=ETAG, size=3, sequencer="1870A1B2C3D4E5F6")
    status, answer = post(process.url + "/minio/events", body, token=minio.webhook_token)
    assert (status, answer["enqueued"]) == (200, 1)
    (row,) = history(database_url)
    assert row["source_key"] == "det/t1/a b+c.jpg"  # the URL-encoded key was decoded
    assert row["order_key"] == "t1"


def test_the_same_event_delivered_twice_makes_one_move(
    reactor: tuple[ReactorProcess, str], database_url: str, minio: MinioStack
) -> None:
    process, src = reactor
    body = webhook_body(bucket=src, key="det/t1/x.jpg", etag=ETAG, size=3, sequencer="1870A1B2C3D4E5F6")
    first = post(process.url + "/minio/events", body, token=minio.webhook_token)
    second = post(process.url + "/minio/events", body, token=minio.webhook_token)
    assert first == (200, {"enqueued": 1, "duplicate": 0, "ignored": 0, "failed": 0})
    assert second == (200, {"enqueued": 0, "duplicate": 1, "ignored": 0, "failed": 0})
    assert moves(database_url) == 1


@pytest.mark.parametrize(
    ("body", "content_type", "status", "message"),
    [
        (b"not json", "application/json", 400, "not valid JSON"),
        (b'{"Records": [{"eventName": "s3:ObjectCreated:Put"}]}', "application/json", 400, "s3"),
        (b"[]", "application/json", 400, "object"),
        (b'{"Records": "x"}', "application/json", 400, "Records"),
        (b"\xff\xfe", "application/json", 400, "UTF-8"),
        (b"{}", "text/plain", 415, "application/json"),
        (b"x" * (1024 * 1024 + 1), "application/json", 413, "REACTOR_WEBHOOK_MAX_BODY"),
    ],
)
def test_bad_bodies_are_refused_with_a_reason_and_write_nothing(
    reactor: tuple[ReactorProcess, str],
    database_url: str,
    minio: MinioStack,
    body: bytes,
    content_type: str,
    status: int,
    message: str,
) -> None:
    process, _ = reactor
    got, answer = post(
        process.url + "/minio/events", body, token=minio.webhook_token, content_type=content_type
    )
    assert got == status
    assert message in answer["error"]
    assert moves(database_url) == 0


@pytest.mark.parametrize("token", [None, "wrong-token", ""])
def test_a_missing_or_wrong_token_gets_401_and_writes_nothing(
    reactor: tuple[ReactorProcess, str], database_url: str, token: str | None
) -> None:
    process, src = reactor
    body = webhook_body(bucket=src, key="det/t1/x.jpg", etag=ETAG, size=3, sequencer="1870A1B2C3D4E5F6")
    status, answer = post(process.url + "/minio/events", body, token=token)
    assert status == 401
    assert "REACTOR_WEBHOOK_TOKEN" in answer["error"]
    assert moves(database_url) == 0


def test_unmatched_keys_and_non_upload_events_get_2xx_and_write_nothing(
    reactor: tuple[ReactorProcess, str], database_url: str, minio: MinioStack
) -> None:
    process, src = reactor
    unmatched = webhook_body(bucket=src, key="too/deep/for/the/rule.jpg", etag=ETAG, size=1, sequencer="1")
    other_bucket = webhook_body(bucket="elsewhere", key="det/t1/x.jpg", etag=ETAG, size=1, sequencer="1")
    tagging = json.loads(webhook_body(bucket=src, key="det/t1/x.jpg", etag=ETAG, size=1, sequencer="1"))
    tagging["Records"][0]["eventName"] = "s3:ObjectCreated:PutTagging"
    for body in (unmatched, other_bucket, json.dumps(tagging).encode(), b'{"Records": []}'):
        status, answer = post(process.url + "/minio/events", body, token=minio.webhook_token)
        assert status == 200
        assert answer["enqueued"] == 0
    assert moves(database_url) == 0


def test_an_unsafe_target_is_recorded_failed_and_never_written(
    reactor: tuple[ReactorProcess, str], database_url: str, minio: MinioStack
) -> None:
    process, src = reactor
    body = webhook_body(bucket=src, key="det/t1/..", etag=ETAG, size=1, sequencer="1")
    status, answer = post(process.url + "/minio/events", body, token=minio.webhook_token)
    assert (status, answer["failed"]) == (200, 1)
    (row,) = history(database_url)
    assert row["status"] == "failed"
    assert "alerts" in row["last_error"]
    assert "det/t1/.." in row["last_error"]


def test_health_and_readiness(reactor: tuple[ReactorProcess, str]) -> None:
    process, _ = reactor
    for path, expected in (("/healthz", "ok"), ("/readyz", "ready")):
        with urllib.request.urlopen(process.url + path, timeout=5) as response:  # noqa: S310 - loopback
            assert response.status == 200
            assert json.loads(response.read())["status"] == expected
