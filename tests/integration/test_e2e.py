"""End to end on the real MinIO and PostgreSQL: uploads in, verified moves out, every step in SQL."""

from __future__ import annotations

import hashlib
import itertools
import os
import random
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tests.support.e2e import (
    alerts_rule,
    history,
    keys,
    nudging,
    put,
    sha256_of,
    wait_for,
    wait_listening,
    wait_settled,
    write_rules,
)
from tests.support.stack import BucketNames, MinioStack, ReactorSpawner, reactor_env, run_cli


def setup_stack(minio: MinioStack, database_url: str, rules: Path) -> None:
    """`reactor setup` creates the buckets and subscribes the sources to the webhook queue."""
    run_cli(["setup"], env=reactor_env(minio, database_url=database_url, rules_path=rules), check=True)


def test_200_images_across_10_tasks_by_8_uploaders(
    tmp_path: Path, minio: MinioStack, database_url: str, buckets: BucketNames, spawn_reactor: ReactorSpawner
) -> None:
    # Given two instances (one receives the webhook, both poll) and a subscribed source bucket
    src, dst = buckets("img"), buckets("alr")
    rules = write_rules(tmp_path / "rules.toml", alerts_rule(src, dst))
    setup_stack(minio, database_url, rules)
    spawn_reactor(database_url=database_url, rules_path=rules, http_port=minio.webhook_port)
    spawn_reactor(database_url=database_url, rules_path=rules)
    client = minio.client()
    rng = random.Random(7)
    uploads = [
        (f"detect/task{i % 10}/img{i:03d}.jpg", rng.randbytes(rng.randint(1, 64 * 1024))) for i in range(200)
    ]

    # When 8 uploaders upload 200 images over 10 tasks
    with ThreadPoolExecutor(8) as pool:
        digests = dict(
            zip([k for k, _ in uploads], pool.map(lambda u: put(client, src, *u), uploads), strict=True)
        )
    rows = wait_settled(database_url, 200)

    # Then every image is at its target with identical bytes, every source is gone
    assert keys(client, src) == []
    assert keys(client, dst) == sorted(digests)
    for key, digest in digests.items():
        assert sha256_of(client, dst, key) == digest, key
    # And exactly one done move per upload
    assert sorted(r["source_key"] for r in rows) == sorted(digests)
    assert {r["status"] for r in rows} == {"done"}
    # And per task: seqs 1..n, finished in seq order, no two moves of a task overlapping in time
    by_task: dict[str, list[dict[str, object]]] = {}
    for r in rows:
        by_task.setdefault(str(r["order_key"]), []).append(r)
    assert len(by_task) == 10
    for task, moves in by_task.items():
        moves.sort(key=lambda r: r["seq"])  # type: ignore[arg-type,return-value]
        assert [m["seq"] for m in moves] == list(range(1, len(moves) + 1)), task
        for earlier, later in itertools.pairwise(moves):
            assert earlier["finished_at"] <= later["started_at"], (task, earlier["seq"], later["seq"])  # type: ignore[operator]


def test_sequential_uploads_through_the_webhook_queue_move_in_upload_order(
    tmp_path: Path, minio: MinioStack, database_url: str, buckets: BucketNames, spawn_reactor: ReactorSpawner
) -> None:
    # Given a reactor behind MinIO's webhook queue (queue_dir, sync events)
    src, dst = buckets("img"), buckets("alr")
    rules = write_rules(tmp_path / "rules.toml", alerts_rule(src, dst))
    setup_stack(minio, database_url, rules)
    spawn_reactor(database_url=database_url, rules_path=rules, http_port=minio.webhook_port)
    client = minio.client()
    # When one task's images are uploaded one after another
    order = [f"cam/t7/{n:02d}-{os.urandom(3).hex()}.jpg" for n in range(40)]
    for key in order:
        put(client, src, key, os.urandom(512))
    rows = wait_settled(database_url, 40)
    # Then they were numbered and moved in upload order
    assert [r["source_key"] for r in sorted(rows, key=lambda r: r["seq"])] == order
    by_finish = sorted(rows, key=lambda r: r["finished_at"])
    assert [r["source_key"] for r in by_finish] == order
    assert {r["status"] for r in rows} == {"done"}


def test_unusual_keys_round_trip_through_webhook_and_listen(
    tmp_path: Path, minio: MinioStack, database_url: str, buckets: BucketNames, spawn_reactor: ReactorSpawner
) -> None:
    # Given the webhook bucket and a second bucket ingested by listening (raw keys), one with deep paths
    src, dst, listened = buckets("img"), buckets("alr"), buckets("lst")
    rules = write_rules(
        tmp_path / "rules.toml",
        alerts_rule(src, dst),
        {
            "name": "deep",
            "source_bucket": listened,
            "pattern": "{task_id}/{rest:path}",
            "target_bucket": dst,
            "target": "deep/{task_id}/{rest}",
            "order_key": "{task_id}",
        },
    )
    setup_stack(minio, database_url, rules)
    client = minio.client()
    # (the listened bucket must not also be on the webhook: unsubscribe it)
    client.delete_bucket_notification(listened)
    spawn_reactor(
        database_url=database_url,
        rules_path=rules,
        http_port=minio.webhook_port,
        env={"REACTOR_LISTEN": "true"},
    )
    wait_listening(client, listened, lambda: "".join(p.log_text() for p in spawn_reactor.processes))
    webhook_keys = [
        "det/task one/a b.jpg",
        "det/t+1/x+y.jpg",
        "det/t%25/100%.jpg",
        "det/测试10/猫 1.jpg",
        "det/t~!@$&()=;,'/q.jpg",
    ]
    listen_keys = ["测试10/a/b c/d+e/f%20.jpg", "t2/x/y/z/1/2/3/deep.bin", "t+3/%41/ü.jpg"]
    # When they are uploaded
    digests = {("w", k): put(client, src, k, k.encode() * 3) for k in webhook_keys}
    digests |= {("l", k): put(client, listened, k, k.encode() * 5) for k in listen_keys}
    with nudging(client, listened):
        rows = wait_settled(database_url, len(digests))
    # Then each arrived at exactly the key its rule renders, byte for byte
    assert {r["status"] for r in rows} == {"done"}, rows
    for (way, key), digest in digests.items():
        target = key if way == "w" else "deep/" + key
        assert sha256_of(client, dst, target) == digest, (way, key)
    assert {r["order_key"] for r in rows} >= {"测试10", "task one", "t+1", "t%25"}
    assert keys(client, src) == []
    assert keys(client, listened) == []


def test_one_key_uploaded_twice_quickly_ends_with_the_second_upload(
    tmp_path: Path, minio: MinioStack, database_url: str, buckets: BucketNames, spawn_reactor: ReactorSpawner
) -> None:
    src, dst = buckets("img"), buckets("alr")
    rules = write_rules(tmp_path / "rules.toml", alerts_rule(src, dst))
    setup_stack(minio, database_url, rules)
    spawn_reactor(database_url=database_url, rules_path=rules, http_port=minio.webhook_port)
    client = minio.client()
    for round_ in range(5):
        key = f"det/t{round_}/same.jpg"
        # Given two uploads to one key in quick succession
        put(client, src, key, b"first" * 100)
        second = put(client, src, key, b"second" * 100)
        rows = wait_settled(database_url, 2 * (round_ + 1))
        moves = sorted((r for r in rows if r["source_key"] == key), key=lambda r: r["seq"])
        # Then the target ends with the second upload's bytes, and nothing is left unmoved
        assert sha256_of(client, dst, key) == second
        assert keys(client, src, f"det/t{round_}/") == []
        first_move, second_move = moves
        assert second_move["status"] == "done"
        # And the first move was superseded, or done before the second started
        assert first_move["status"] in ("superseded", "done")
        if first_move["status"] == "done":
            assert first_move["finished_at"] <= second_move["started_at"]


def test_the_same_upload_notified_twice_makes_one_move(
    tmp_path: Path, minio: MinioStack, database_url: str, buckets: BucketNames, spawn_reactor: ReactorSpawner
) -> None:
    # Given a bucket ingested by BOTH the webhook and two listening instances (three notices per upload)
    src, dst = buckets("img"), buckets("alr")
    rules = write_rules(tmp_path / "rules.toml", alerts_rule(src, dst))
    setup_stack(minio, database_url, rules)
    listening = {"REACTOR_LISTEN": "true"}
    first = spawn_reactor(
        database_url=database_url, rules_path=rules, http_port=minio.webhook_port, env=listening
    )
    second = spawn_reactor(database_url=database_url, rules_path=rules, env=listening)
    client = minio.client()
    for instance in (first, second):
        wait_listening(client, src, instance.log_text)
    # When 30 images are uploaded
    digests = {
        f"d/t{i % 3}/{i}.jpg": put(client, src, f"d/t{i % 3}/{i}.jpg", os.urandom(100)) for i in range(30)
    }
    with nudging(client, src):
        rows = wait_settled(database_url, 30)
        # Both listeners and the webhook delivered every upload: two of each three were duplicates
        wait_for(
            lambda: (first.log_text() + second.log_text()).count("upload_duplicate") >= 60,
            timeout=30,
            what="both listeners and the webhook to deliver every upload",
        )
    # Then there is exactly one move per upload, all done
    rows = history(database_url)
    assert len(rows) == 30
    assert sorted(r["source_key"] for r in rows) == sorted(digests)
    assert {r["status"] for r in rows} == {"done"}
    for key, digest in digests.items():
        assert sha256_of(client, dst, key) == digest


def test_multipart_upload_is_verified_and_moved(
    tmp_path: Path, minio: MinioStack, database_url: str, buckets: BucketNames, spawn_reactor: ReactorSpawner
) -> None:
    src, dst = buckets("img"), buckets("alr")
    rules = write_rules(tmp_path / "rules.toml", alerts_rule(src, dst))
    setup_stack(minio, database_url, rules)
    spawn_reactor(database_url=database_url, rules_path=rules, http_port=minio.webhook_port)
    client = minio.client()
    data = os.urandom(12 * 1024 * 1024)
    digest = put(client, src, "vid/t1/clip.mp4", data, part_size=5 * 1024 * 1024)
    (row,) = wait_settled(database_url, 1)
    assert row["status"] == "done"
    assert row["etag"].endswith("-3")
    assert sha256_of(client, dst, "vid/t1/clip.mp4") == digest == hashlib.sha256(data).hexdigest()
    target = client.stat_object(dst, "vid/t1/clip.mp4")
    recorded = history(database_url)[0]
    assert recorded["size"] == len(data) == target.size
