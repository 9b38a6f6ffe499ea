"""The reconcile sweep on the real services: uploads whose notification never came are still moved."""

from __future__ import annotations

import os
import threading
from pathlib import Path

from tests.support.e2e import alerts_rule, history, put, sha256_of, sql, wait_for, wait_settled, write_rules
from tests.support.stack import BucketNames, MinioStack, ReactorSpawner, reactor_env, run_cli


def test_the_scheduled_sweep_moves_uploads_nobody_notified(
    tmp_path: Path, minio: MinioStack, database_url: str, buckets: BucketNames, spawn_reactor: ReactorSpawner
) -> None:
    # Given a source bucket with no subscription and no listener: no notification ever arrives
    src, dst = buckets.make("img"), buckets.make("alr")
    rules = write_rules(tmp_path / "rules.toml", alerts_rule(src, dst))
    client = minio.client()
    digests = {
        f"det/t{i % 2}/{i}.jpg": put(client, src, f"det/t{i % 2}/{i}.jpg", os.urandom(99)) for i in range(6)
    }
    # When a reactor runs with a short sweep interval
    spawn_reactor(
        database_url=database_url,
        rules_path=rules,
        env={"REACTOR_RECONCILE_INTERVAL": "1", "REACTOR_RECONCILE_GRACE": "0"},
    )
    rows = wait_settled(database_url, 6, timeout=60)
    # Then every upload was found and moved, and the audit trail says the sweep found it
    assert {r["status"] for r in rows} == {"done"}
    for key, digest in digests.items():
        assert sha256_of(client, dst, key) == digest
    vias = sql(
        database_url, "SELECT DISTINCT detail->>'via' AS via FROM reactor.move_events WHERE kind = 'enqueued'"
    )
    assert vias == [{"via": "sweep"}]
    assert {r["via"] for r in rows} == {"sweep"}


def test_the_grace_period_leaves_recent_uploads_to_their_events(
    tmp_path: Path, minio: MinioStack, database_url: str, buckets: BucketNames
) -> None:
    src, dst = buckets.make("img"), buckets.make("alr")
    rules = write_rules(tmp_path / "rules.toml", alerts_rule(src, dst))
    put(minio.client(), src, "det/t1/a.jpg", b"a")
    env = reactor_env(
        minio, database_url=database_url, rules_path=rules, env={"REACTOR_RECONCILE_GRACE": "3600"}
    )
    result = run_cli(["reconcile"], env=env, check=True)
    assert "enqueued 0" in result.stdout
    assert "too recent 1" in result.stdout
    assert history(database_url) == []


def test_concurrent_sweeps_create_no_duplicates(
    tmp_path: Path, minio: MinioStack, database_url: str, buckets: BucketNames
) -> None:
    # Given 30 unnotified uploads over 3 tasks
    src, dst = buckets.make("img"), buckets.make("alr")
    rules = write_rules(tmp_path / "rules.toml", alerts_rule(src, dst))
    client = minio.client()
    for i in range(30):
        put(client, src, f"det/t{i % 3}/{i}.jpg", b"x" * i)
    env = reactor_env(
        minio, database_url=database_url, rules_path=rules, env={"REACTOR_RECONCILE_GRACE": "0"}
    )
    # When three sweeps run at once
    results: list[str] = []
    threads = [
        threading.Thread(target=lambda: results.append(run_cli(["reconcile"], env=env, check=True).stdout))
        for _ in range(3)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    # Then there is exactly one move per upload, with gap-free seqs per task
    rows = history(database_url)
    assert len(rows) == 30
    assert sorted(r["seq"] for r in rows if r["order_key"] == "t0") == list(range(1, 11))
    enqueued = sum(int(out.split("enqueued ")[1].split(",")[0]) for out in results)
    assert enqueued == 30


def test_a_swept_upload_and_its_late_event_make_one_move(
    tmp_path: Path, minio: MinioStack, database_url: str, buckets: BucketNames, spawn_reactor: ReactorSpawner
) -> None:
    # Given uploads whose events wait in MinIO's queue (no reactor on the webhook port yet)
    src, dst = buckets("img"), buckets("alr")
    rules = write_rules(tmp_path / "rules.toml", alerts_rule(src, dst))
    env = reactor_env(
        minio, database_url=database_url, rules_path=rules, env={"REACTOR_RECONCILE_GRACE": "0"}
    )
    run_cli(["setup"], env=env, check=True)
    client = minio.client()
    for i in range(5):
        put(client, src, f"det/t1/{i}.jpg", os.urandom(10))
    # When the sweep finds them first, and then the events arrive
    assert "enqueued 5" in run_cli(["reconcile"], env=env, check=True).stdout
    reactor = spawn_reactor(database_url=database_url, rules_path=rules, http_port=minio.webhook_port,
                            env={"REACTOR_RECONCILE_INTERVAL": "0"})  # fmt: skip
    rows = wait_settled(database_url, 5)
    wait_for(lambda: reactor.log_text().count("upload_duplicate") >= 5, timeout=30, what="the late events")
    # Then each upload was moved once
    assert len(history(database_url)) == 5
    assert {r["status"] for r in rows} == {"done"}
