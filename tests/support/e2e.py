"""Helpers for end-to-end tests: rules files, uploads, waiting on the outbox, reading history."""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import io
import json
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import psycopg
from minio import Minio
from psycopg.rows import dict_row
from sqlalchemy.engine import make_url

T = TypeVar("T")


def write_rules(path: Path, *rules: Mapping[str, str]) -> Path:
    lines = []
    for rule in rules:
        lines.append("[[rules]]")
        lines.extend(f"{k} = {json.dumps(v, ensure_ascii=False)}" for k, v in rule.items())
        lines.append("")
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def alerts_rule(src: str, dst: str, **extra: str) -> dict[str, str]:
    """The README's rule: images of a task move to the same path in the target, in task order."""
    return {
        "name": "alerts",
        "source_bucket": src,
        "pattern": "{task_type}/{task_id}/{filename}",
        "target_bucket": dst,
        "target": "{task_type}/{task_id}/{filename}",
        "order_key": "{task_id}",
        **extra,
    }


def conninfo(database_url: str) -> str:
    return make_url(database_url).set(drivername="postgresql").render_as_string(hide_password=False)


def sql(database_url: str, query: str, params: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
    with psycopg.connect(conninfo(database_url), autocommit=True, row_factory=dict_row) as conn:
        cursor = conn.execute(query, params or {})  # type: ignore[arg-type]
        return list(cursor.fetchall()) if cursor.description is not None else []


def history(
    database_url: str, where: str = "true", params: Mapping[str, Any] | None = None
) -> list[dict[str, Any]]:
    return sql(
        database_url, f"SELECT * FROM reactor.move_history WHERE {where} ORDER BY order_key, seq", params
    )


def events_of(database_url: str, move_id: int) -> list[dict[str, Any]]:
    return sql(
        database_url,
        "SELECT kind, worker, detail, at FROM reactor.move_events WHERE move_id = %(id)s ORDER BY at, id",
        {"id": move_id},
    )


def wait_for(check: Callable[[], T], *, timeout: float, what: str, interval: float = 0.1) -> T:
    """Poll until check() is truthy; fail naming what was awaited and the last value seen."""
    deadline = time.monotonic() + timeout
    last: T = check()
    while not last:
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}; last seen: {last!r}")
        time.sleep(interval)
        last = check()
    return last


def wait_settled(database_url: str, expected: int, *, timeout: float = 120.0) -> list[dict[str, Any]]:
    """Wait until `expected` moves exist and none is pending or running; returns the history."""

    def settled() -> list[dict[str, Any]] | None:
        rows = history(database_url)
        if len(rows) >= expected and all(r["status"] not in ("pending", "running") for r in rows):
            return rows
        return None

    def summary() -> str:
        rows = history(database_url)
        counts: dict[str, int] = {}
        for r in rows:
            counts[r["status"]] = counts.get(r["status"], 0) + 1
        return f"{len(rows)} moves of {expected}: {counts}"

    try:
        return wait_for(settled, timeout=timeout, what=f"{expected} settled moves")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; now {summary()}") from None


def wait_listening(client: Minio, bucket: str, logs: Callable[[], str], *, timeout: float = 30.0) -> None:
    """Listen streams give no sign of life before an event: upload canaries matching no rule until
    the reactor logs one as heard via listen, so uploads after this are certainly heard. The
    canaries are removed again."""
    deadline = time.monotonic() + timeout
    n = 0
    try:
        while time.monotonic() < deadline:
            client.put_object(bucket, f"zz-canary-{n}", io.BytesIO(b"."), 1)
            n += 1
            end = time.monotonic() + 1.0
            while time.monotonic() < end:
                heard = [
                    line
                    for line in logs().splitlines()
                    if '"key": "zz-canary-' in line and '"via": "listen"' in line and bucket in line
                ]
                if heard:
                    return
                time.sleep(0.05)
        raise AssertionError(f"no listener on {bucket} heard a canary upload within {timeout:.0f}s")
    finally:
        for i in range(n):
            client.remove_object(bucket, f"zz-canary-{i}")


@contextmanager
def nudging(client: Minio, *buckets: str, interval: float = 0.1) -> Iterator[None]:
    """MinIO buffers a listen stream and sends it only when some kilobytes of events have piled up
    (seen on the pinned server: three small events at a time), so the last few uploads can sit
    unsent. While a listen test waits, keep uploading small objects that match no rule to push
    them out; they are removed afterwards."""
    stop = threading.Event()
    written: list[tuple[str, str]] = []

    def run() -> None:
        n = 0
        while not stop.wait(interval):
            for bucket in buckets:
                key = f"zz-nudge-{n}"
                client.put_object(bucket, key, io.BytesIO(b"."), 1)
                written.append((bucket, key))
            n += 1

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        for bucket, key in written:
            client.remove_object(bucket, key)


def put(client: Minio, bucket: str, key: str, data: bytes, *, part_size: int = 0) -> str:
    """Upload and return the sha256 of the bytes (multipart when part_size is set)."""
    if part_size:
        client.put_object(bucket, key, io.BytesIO(data), -1, part_size=part_size)
    else:
        client.put_object(bucket, key, io.BytesIO(data), len(data))
    return hashlib.sha256(data).hexdigest()


def sha256_of(client: Minio, bucket: str, key: str) -> str | None:
    try:
        response = client.get_object(bucket, key)
    except Exception:
        return None
    try:
        return hashlib.sha256(response.read()).hexdigest()
    finally:
        response.close()
        response.release_conn()


def keys(client: Minio, bucket: str, prefix: str = "") -> list[str]:
    return sorted(str(o.object_name) for o in client.list_objects(bucket, prefix=prefix, recursive=True))


def post(
    url: str, body: bytes, *, token: str | None, content_type: str = "application/json"
) -> tuple[int, Any]:
    """POST like MinIO does; a server that answers before reading the whole body (413) is fine."""
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=10)
    try:
        conn.putrequest("POST", parts.path)
        conn.putheader("Content-Type", content_type)
        conn.putheader("Content-Length", str(len(body)))
        if token is not None:
            conn.putheader("Authorization", f"Bearer {token}")
        conn.endheaders()
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            conn.send(body)
        response = conn.getresponse()
        return int(response.status), json.loads(response.read() or b"null")
    finally:
        conn.close()


def webhook_body(
    *, bucket: str, key: str, etag: str, size: int, sequencer: str, version_id: str = ""
) -> bytes:
    """A webhook POST as MinIO sends it: one record, the key URL-encoded like Go's QueryEscape."""
    from urllib.parse import quote_plus

    record = {
        "eventVersion": "2.0",
        "eventSource": "minio:s3",
        "awsRegion": "",
        "eventTime": "2026-12-04T00:00:00.000Z",
        "eventName": "s3:ObjectCreated:Put",
        "userIdentity": {"principalId": "test"},
        "requestParameters": {"principalId": "test", "region": "", "sourceIPAddress": "127.0.0.1"},
        "responseElements": {},
        "s3": {
            "s3SchemaVersion": "1.0",
            "configurationId": "Config",
            "bucket": {
                "name": bucket,
                "ownerIdentity": {"principalId": "test"},
                "arn": f"arn:aws:s3:::{bucket}",
            },
            "object": {
                "key": quote_plus(key, safe=""),
                "size": size,
                "eTag": etag,
                "contentType": "image/jpeg",
                "userMetadata": {},
                "versionId": version_id,
                "sequencer": sequencer,
            },
        },
        "source": {"host": "127.0.0.1", "port": "", "userAgent": "test"},
    }
    return json.dumps(
        {"EventName": "s3:ObjectCreated:Put", "Key": f"{bucket}/{key}", "Records": [record]}
    ).encode()
