"""Failures on the real services: conflicts, retries with backoff, blocked keys, and the CLI."""

from __future__ import annotations

import json
from pathlib import Path

from tests.support.e2e import (
    alerts_rule,
    events_of,
    history,
    nudging,
    put,
    sha256_of,
    wait_for,
    wait_listening,
    wait_settled,
    write_rules,
)
from tests.support.stack import BucketNames, MinioStack, ReactorSpawner, reactor_env, run_cli


def test_on_conflict_fail_with_block_stops_the_key_until_retry(
    tmp_path: Path, minio: MinioStack, database_url: str, buckets: BucketNames, spawn_reactor: ReactorSpawner
) -> None:
    # Given on_conflict=fail, REACTOR_ON_FAILURE=block, and a target that already holds other bytes
    src, dst = buckets("img"), buckets("alr")
    rules = write_rules(tmp_path / "rules.toml", alerts_rule(src, dst, on_conflict="fail"))
    env = reactor_env(minio, database_url=database_url, rules_path=rules)
    run_cli(["setup"], env=env, check=True)
    client = minio.client()
    put(client, dst, "det/t1/a.jpg", b"someone else's")
    spawn_reactor(database_url=database_url, rules_path=rules, http_port=minio.webhook_port,
                  env={"REACTOR_ON_FAILURE": "block"})  # fmt: skip
    # When two images of the task are uploaded
    first = put(client, src, "det/t1/a.jpg", b"ours")
    second = put(client, src, "det/t1/b.jpg", b"next")
    failed = wait_for(lambda: history(database_url, "status = 'failed'"), timeout=60, what="the conflict")
    # Then the first move failed at once (no retries), the second waits behind it
    assert failed[0]["attempts"] == 1
    assert "on_conflict=fail" in failed[0]["last_error"]
    assert history(database_url, "seq = 2")[0]["status"] == "pending"
    status = json.loads(run_cli(["status", "--json"], env=env, check=True).stdout)
    assert status["counts"]["failed"] == 1
    assert [k["order_key"] for k in status["blocked_keys"]] == ["t1"]
    assert sha256_of(client, dst, "det/t1/a.jpg") != first  # the other bytes were left alone
    # When the operator clears the target and retries the move
    client.remove_object(dst, "det/t1/a.jpg")
    result = run_cli(["retry", str(failed[0]["move_id"])], env=env, check=True)
    assert "retried 1 move" in result.stdout
    rows = wait_settled(database_url, 2)
    # Then both are moved, in order
    assert [(r["seq"], r["status"]) for r in rows] == [(1, "done"), (2, "done")]
    assert sha256_of(client, dst, "det/t1/a.jpg") == first
    assert sha256_of(client, dst, "det/t1/b.jpg") == second
    kinds = [e["kind"] for e in events_of(database_url, failed[0]["move_id"])]
    assert kinds == ["enqueued", "claimed", "failed", "retried", "claimed", "done"]
    # And history answers per order key, as JSON lines
    lines = run_cli(["history", "--order-key", "t1", "--json"], env=env, check=True).stdout.splitlines()
    assert [json.loads(line)["seq"] for line in lines] == [1, 2]


def test_on_conflict_skip_leaves_both_and_records_a_note(
    tmp_path: Path, minio: MinioStack, database_url: str, buckets: BucketNames, spawn_reactor: ReactorSpawner
) -> None:
    src, dst = buckets("img"), buckets("alr")
    rules = write_rules(tmp_path / "rules.toml", alerts_rule(src, dst, on_conflict="skip"))
    run_cli(["setup"], env=reactor_env(minio, database_url=database_url, rules_path=rules), check=True)
    client = minio.client()
    theirs = put(client, dst, "det/t1/a.jpg", b"theirs")
    spawn_reactor(database_url=database_url, rules_path=rules, http_port=minio.webhook_port)
    ours = put(client, src, "det/t1/a.jpg", b"ours")
    (row,) = wait_settled(database_url, 1)
    assert row["status"] == "done"
    assert "on_conflict=skip" in row["note"]
    assert sha256_of(client, dst, "det/t1/a.jpg") == theirs
    assert sha256_of(client, src, "det/t1/a.jpg") == ours


def test_a_failing_move_retries_with_backoff_and_its_key_waits(
    tmp_path: Path, minio: MinioStack, database_url: str, buckets: BucketNames, spawn_reactor: ReactorSpawner
) -> None:
    # Given a target bucket that does not exist yet (every copy fails)
    src, dst = buckets.make("img"), buckets("alr")
    rules = write_rules(tmp_path / "rules.toml", alerts_rule(src, dst))
    client = minio.client()
    fast_retries = {
        "REACTOR_LISTEN": "true",
        "REACTOR_RETRY_BASE_DELAY": "0.3",
        "REACTOR_RETRY_MAX_DELAY": "1",
        "REACTOR_MAX_ATTEMPTS": "50",
    }
    spawn_reactor(database_url=database_url, rules_path=rules, env=fast_retries)
    # (no webhook subscription for this bucket: the listener alone ingests)
    wait_listening(client, src, spawn_reactor.processes[0].log_text)
    put(client, src, "det/t9/1.jpg", b"one")
    put(client, src, "det/t9/2.jpg", b"two")
    with nudging(client, src):
        retrying = wait_for(
            lambda: history(database_url, "seq = 1 AND attempts >= 3"), timeout=60, what="three attempts"
        )
    # Then the first move is pending with its error, and the second never started
    assert retrying[0]["status"] in ("pending", "running")
    assert "NoSuchBucket" in retrying[0]["last_error"]
    assert history(database_url, "seq = 2")[0]["started_at"] is None
    # When the bucket appears, both finish, in order
    client.make_bucket(dst)
    rows = wait_settled(database_url, 2)
    assert [r["status"] for r in rows] == ["done", "done"]
    assert rows[0]["finished_at"] <= rows[1]["started_at"]
    kinds = [e["kind"] for e in events_of(database_url, rows[0]["move_id"])]
    assert kinds.count("retry_scheduled") >= 2


def test_cli_reports_bad_configuration_clearly(tmp_path: Path, minio: MinioStack, database_url: str) -> None:
    env = reactor_env(minio, database_url=database_url, rules_path=tmp_path / "missing.toml")
    result = run_cli(["setup"], env=env)
    assert result.returncode != 0
    assert "missing.toml" in result.stderr
    bad = reactor_env(minio, database_url=database_url, env={"REACTOR_CONCURRENCY": "lots"})
    result = run_cli(["status"], env=bad)
    assert result.returncode == 2
    assert "REACTOR_CONCURRENCY" in result.stderr
    secret = reactor_env(minio, database_url="mysql://user:hunter2@host/db")
    result = run_cli(["status"], env=secret)
    assert result.returncode == 2
    assert "REACTOR_DATABASE_URL" in result.stderr
    assert "hunter2" not in result.stderr + result.stdout
    loop = tmp_path / "loop.toml"
    write_rules(loop, {"name": "loop", "source_bucket": "same", "pattern": "{a}/{b}", "target_bucket": "same",
                       "target": "done/{b}"})  # fmt: skip
    result = run_cli(["run"], env=reactor_env(minio, database_url=database_url, rules_path=loop))
    assert result.returncode == 2
    assert "loop" in result.stderr
    # A webhook reachable from other hosts without a token is refused, with the fix in the message
    exposed = reactor_env(
        minio,
        database_url=database_url,
        rules_path=write_rules(tmp_path / "ok.toml", alerts_rule("aaa", "bbb")),
        env={"REACTOR_HTTP_ADDR": "0.0.0.0:8999"},
    )
    del exposed["REACTOR_WEBHOOK_TOKEN"]
    result = run_cli(["run"], env=exposed)
    assert result.returncode == 2
    assert "REACTOR_WEBHOOK_TOKEN" in result.stderr
    assert "REACTOR_ALLOW_UNAUTHENTICATED" in result.stderr
    # An empty token is refused rather than silently meaning "no authentication"
    result = run_cli(["run"], env={**exposed, "REACTOR_WEBHOOK_TOKEN": ""})
    assert result.returncode == 2
    assert "REACTOR_WEBHOOK_TOKEN: Value error, must not be empty" in result.stderr


def test_retry_of_unknown_moves_says_so(minio: MinioStack, database_url: str) -> None:
    env = reactor_env(minio, database_url=database_url)
    result = run_cli(["retry", "424242"], env=env)
    assert result.returncode == 1
    assert "424242" in result.stderr
    result = run_cli(["retry"], env=env)
    assert result.returncode == 2
    assert "--failed" in result.stderr


def test_setup_is_idempotent_and_subscribes_by_literal_prefix(
    tmp_path: Path, minio: MinioStack, database_url: str, buckets: BucketNames
) -> None:
    src, dst = buckets("img"), buckets("alr")
    rules = write_rules(
        tmp_path / "rules.toml",
        {
            "name": "a",
            "source_bucket": src,
            "pattern": "cams/{t}/{f}",
            "target_bucket": dst,
            "target": "{t}/{f}",
        },
    )
    env = reactor_env(minio, database_url=database_url, rules_path=rules)
    first = run_cli(["setup"], env=env, check=True).stdout
    assert f"created bucket {src}" in first
    assert "subscribed" in first
    assert run_cli(["setup"], env=env, check=True).stdout.strip() == "nothing to change"
    config = minio.client().get_bucket_notification(src)
    (queue,) = config.queue_config_list
    assert queue.queue == minio.arn
    assert queue.prefix_filter_rule is not None
    assert queue.prefix_filter_rule.value == "cams/"
    assert sorted(queue.events) == [
        "s3:ObjectCreated:CompleteMultipartUpload",
        "s3:ObjectCreated:Copy",
        "s3:ObjectCreated:Post",
        "s3:ObjectCreated:Put",
    ]
