"""The test stack itself: real PostgreSQL and MinIO, started by the session fixtures, behave."""

from __future__ import annotations

import io
import re

import psycopg
import pytest
from minio.error import S3Error

from reactor.devstack import PostgresServer
from tests.support import BucketNames, MinioStack


def test_a_fresh_database_answers_and_can_be_dropped(pg: PostgresServer) -> None:
    # Given a database created on the session server
    pg.create_database("smoke_fresh")
    try:
        # When we query it
        with pg.connect("smoke_fresh") as conn:
            row = conn.execute("select 1").fetchone()
        # Then it answers, on loopback, through the URL the reactor would use
        assert row == (1,)
        assert pg.url("smoke_fresh") == f"postgresql+psycopg://postgres@127.0.0.1:{pg.port}/smoke_fresh"
    finally:
        pg.drop_database("smoke_fresh")
    assert not pg.database_exists("smoke_fresh")


def test_copies_of_a_template_carry_its_schema_even_while_sessions_are_open(pg: PostgresServer) -> None:
    # Given a template with a table, and a session still connected to it (as a pool would leave one)
    pg.create_database("smoke_template")
    lingering = pg.connect("smoke_template")
    try:
        lingering.execute("create table t (id int primary key); insert into t values (7)")
        # When a copy is made, and then dropped while a session is connected to the copy
        pg.create_database("smoke_copy", template="smoke_template")
        with pg.connect("smoke_copy") as conn:
            rows = conn.execute("select id from t").fetchall()
        holder = pg.connect("smoke_copy")
        pg.drop_database("smoke_copy")
        # Then the copy had the template's rows, and the drop went through regardless
        assert rows == [(7,)]
        assert not pg.database_exists("smoke_copy")
        with pytest.raises(psycopg.OperationalError):
            holder.execute("select 1")
        holder.close()
    finally:
        lingering.close()
        pg.drop_database("smoke_copy")
        pg.drop_database("smoke_template")


def test_minio_round_trips_an_object(minio: MinioStack, buckets: BucketNames) -> None:
    # Given a bucket of this test's own
    bucket = buckets.make("smoke")
    client = minio.client()
    # When an object is put, read back and removed
    client.put_object(bucket, "dir/a b+c.txt", io.BytesIO(b"hello"), 5, content_type="text/plain")
    response = client.get_object(bucket, "dir/a b+c.txt")
    try:
        body = response.read()
    finally:
        response.close()
        response.release_conn()
    client.remove_object(bucket, "dir/a b+c.txt")
    # Then the bytes matched and the object is gone
    assert body == b"hello"
    with pytest.raises(S3Error) as gone:
        client.stat_object(bucket, "dir/a b+c.txt")
    assert gone.value.code == "NoSuchKey"


def test_minio_restart_keeps_data_ports_and_webhook_target(minio: MinioStack, buckets: BucketNames) -> None:
    # Given an object in a bucket
    bucket = buckets.make("restart")
    minio.client().put_object(bucket, "k", io.BytesIO(b"kept"), 4)
    endpoint, log_size = minio.endpoint, len(minio.log_text())
    # When the server is restarted
    minio.restart()
    # Then it is back on the same endpoint, with the object and with the webhook target configured
    assert minio.running
    assert minio.endpoint == endpoint
    response = minio.client().get_object(bucket, "k")
    try:
        assert response.read() == b"kept"
    finally:
        response.close()
        response.release_conn()
    assert minio.arn == "arn:minio:sqs::PRIMARY:webhook"
    assert minio.arn in minio.log_text()[log_size:]
    assert minio.webhook_token == "test-token"
    assert minio.env["MINIO_API_SYNC_EVENTS"] == "on"
    assert minio.env["MINIO_NOTIFY_WEBHOOK_ENDPOINT_PRIMARY"] == (
        f"http://127.0.0.1:{minio.webhook_port}/minio/events"
    )


def test_bucket_names_are_valid_and_unique(buckets: BucketNames) -> None:
    names = [buckets("Images_Detect"), buckets("images"), buckets(""), buckets("x" * 100)]
    assert len(set(names)) == len(names)
    for name in names:
        assert re.fullmatch(r"[a-z0-9][a-z0-9-]{1,61}[a-z0-9]", name), name
