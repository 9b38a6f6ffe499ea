"""Crashes and outages on the real services: a killed instance, a stopped PostgreSQL."""

from __future__ import annotations

import os
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from reactor.devstack import TEST_PG_SETTINGS, PostgresServer
from reactor.domain import Upload
from reactor.migrate import upgrade
from reactor.outbox import NewMove, Outbox, make_engine
from tests.support.e2e import (
    alerts_rule,
    events_of,
    history,
    put,
    sha256_of,
    wait_for,
    wait_settled,
    write_rules,
)
from tests.support.stack import BucketNames, MinioStack, ReactorSpawner, reactor_env, run_cli

LEASE = 3.0


def test_a_move_cut_by_kill_9_is_finished_by_another_instance_within_the_lease_bound(
    tmp_path: Path, minio: MinioStack, database_url: str, buckets: BucketNames, spawn_reactor: ReactorSpawner
) -> None:
    # Given one instance with a short lease, and a big multipart upload (copy + hash take a while)
    src, dst = buckets("img"), buckets("alr")
    rules = write_rules(tmp_path / "rules.toml", alerts_rule(src, dst))
    run_cli(["setup"], env=reactor_env(minio, database_url=database_url, rules_path=rules), check=True)
    lease = {"REACTOR_LEASE_SECONDS": str(LEASE)}
    first = spawn_reactor(
        database_url=database_url,
        rules_path=rules,
        http_port=minio.webhook_port,
        env=lease,
        instance_id="first",
    )
    client = minio.client()
    data = os.urandom(200 * 1024 * 1024)
    digest = put(client, src, "vid/t1/big.bin", data, part_size=25 * 1024 * 1024)
    del data

    # When it is killed with SIGKILL in the middle of the move
    wait_for(
        lambda: history(database_url, "status = 'running' AND worker = 'first'"),
        timeout=60,
        interval=0.01,
        what="the move to start",
    )
    first.kill()
    killed_at = time.time()
    spawn_reactor(database_url=database_url, rules_path=rules, env=lease, instance_id="second")
    second_ready = time.time()
    (row,) = wait_settled(database_url, 1, timeout=120)

    # Then the other instance completed it, and the record shows both attempts
    assert row["status"] == "done"
    assert row["worker"] == "second"
    assert row["attempts"] == 2
    assert sha256_of(client, dst, "vid/t1/big.bin") == digest
    assert sha256_of(client, src, "vid/t1/big.bin") is None
    trail = events_of(database_url, row["move_id"])
    assert [(e["kind"], e["worker"]) for e in trail if e["kind"] != "enqueued"][:2] == [
        ("claimed", "first"),
        ("lease_expired", "second"),
    ]
    assert [(e["kind"], e["worker"]) for e in trail][-2:] == [("claimed", "second"), ("done", "second")]
    # And the takeover came within the documented bound: the lease expires at most one lease after
    # the kill (it was renewed every lease/3 until then), and a recovery pass runs every lease/3 and
    # at start, so another instance reclaims it within lease + lease/3 (or as soon as it is up).
    reclaimed = next(e["at"] for e in reversed(trail) if e["kind"] == "claimed").timestamp()
    bound = max(LEASE + LEASE / 3, second_ready - killed_at)
    assert reclaimed - killed_at <= bound + 1.0, (reclaimed - killed_at, bound)


@pytest.fixture
def own_postgres() -> Iterator[PostgresServer]:
    server = PostgresServer(Path(tempfile.mkdtemp(prefix="reactor-pg-outage-")), settings=TEST_PG_SETTINGS)
    server.start()
    try:
        yield server
    finally:
        server.stop("immediate")
        server.cleanup()


def readyz(url: str) -> int:
    try:
        with urllib.request.urlopen(url + "/readyz", timeout=5) as response:  # noqa: S310 - loopback
            return int(response.status)
    except urllib.error.HTTPError as exc:
        exc.close()
        return int(exc.code)


@pytest.mark.parametrize(
    "outage", [pytest.param(3.0, id="3s"), pytest.param(30.0, id="30s", marks=pytest.mark.slow)]
)
def test_postgres_stopped_while_uploads_continue_loses_nothing(
    tmp_path: Path,
    minio: MinioStack,
    own_postgres: PostgresServer,
    buckets: BucketNames,
    spawn_reactor: ReactorSpawner,
    outage: float,
) -> None:
    # Given a reactor on its own PostgreSQL, behind MinIO's webhook queue
    own_postgres.create_database("outage")
    database_url = own_postgres.url("outage")
    upgrade(database_url)
    src, dst = buckets("img"), buckets("alr")
    rules = write_rules(tmp_path / "rules.toml", alerts_rule(src, dst))
    run_cli(["setup"], env=reactor_env(minio, database_url=database_url, rules_path=rules), check=True)
    reactor = spawn_reactor(database_url=database_url, rules_path=rules, http_port=minio.webhook_port)
    client = minio.client()
    digests = {f"det/t{i % 2}/before{i}.jpg": put(client, src, f"det/t{i % 2}/before{i}.jpg", os.urandom(64))
               for i in range(10)}  # fmt: skip
    wait_settled(database_url, 10)

    # When PostgreSQL stops for a few seconds while uploads continue
    own_postgres.stop("fast")
    for i in range(10):
        key = f"det/t{i % 2}/during{i}.jpg"
        digests[key] = put(client, src, key, os.urandom(64))
    wait_for(lambda: readyz(reactor.url) == 503, timeout=10, what="/readyz to report the outage")
    time.sleep(outage)
    assert reactor.alive, reactor.log_tail()
    assert readyz(reactor.url) == 503  # still reporting the outage while it lasts
    own_postgres.start()

    # Then MinIO's queue redelivers what got 503s, and every upload is moved
    rows = wait_settled(database_url, 20, timeout=120)
    assert reactor.alive
    assert readyz(reactor.url) == 200
    assert {r["status"] for r in rows} == {"done"}
    assert sorted(r["source_key"] for r in rows) == sorted(digests)
    for key, digest in digests.items():
        assert sha256_of(client, dst, key) == digest
    assert "webhook_unavailable" in reactor.log_text()  # MinIO was told to retry, and did


def test_sigterm_lets_the_running_move_finish_before_exiting(
    tmp_path: Path, minio: MinioStack, database_url: str, buckets: BucketNames, spawn_reactor: ReactorSpawner
) -> None:
    # Given an instance in the middle of a long move
    src, dst = buckets("img"), buckets("alr")
    rules = write_rules(tmp_path / "rules.toml", alerts_rule(src, dst))
    run_cli(["setup"], env=reactor_env(minio, database_url=database_url, rules_path=rules), check=True)
    reactor = spawn_reactor(database_url=database_url, rules_path=rules, http_port=minio.webhook_port)
    client = minio.client()
    digest = put(client, src, "vid/t1/big.bin", os.urandom(150 * 1024 * 1024), part_size=25 * 1024 * 1024)
    wait_for(lambda: history(database_url, "status = 'running'"), timeout=60, interval=0.01, what="the move")
    # When it is asked to stop (docker stop, systemd)
    reactor.stop(timeout=60)
    # Then it finished the move itself, in one attempt, before exiting
    (row,) = history(database_url)
    assert (row["status"], row["attempts"], row["worker"]) == ("done", 1, reactor.instance_id)
    assert sha256_of(client, dst, "vid/t1/big.bin") == digest
    assert "reactor_stopping" in reactor.log_text()


def test_the_first_call_after_a_postgres_restart_succeeds(own_postgres: PostgresServer) -> None:
    # Given an outbox whose pool holds a connection (no pre-ping checks it on checkout)
    own_postgres.create_database("restart")
    database_url = own_postgres.url("restart")
    upgrade(database_url)
    engine = make_engine(database_url, pool_size=1)
    outbox = Outbox(engine)
    try:
        first = NewMove(upload=_upload("a.jpg"), rule="r", order_key="k", target_bucket="d",
                        target_key="a.jpg", via="webhook")  # fmt: skip
        assert outbox.enqueue(first, worker="w").move_id is not None
        for call in ("enqueue", "claim", "gauges"):
            # When PostgreSQL restarts between two calls (the pooled connection is now dead)
            own_postgres.stop("fast")
            own_postgres.start()
            # Then the next call runs on a fresh connection instead of failing
            if call == "enqueue":
                second = NewMove(upload=_upload("b.jpg"), rule="r", order_key="k", target_bucket="d",
                                 target_key="b.jpg", via="webhook")  # fmt: skip
                assert outbox.enqueue(second, worker="w").seq == 2
            elif call == "claim":
                assert [m.seq for m in outbox.claim(5, worker="w", lease_seconds=30)] == [1]
            else:
                assert outbox.queue_gauges()["running"] == 1.0
    finally:
        engine.dispose()


def _upload(key: str) -> Upload:
    return Upload(bucket="s", key=key, etag="e", size=1)
