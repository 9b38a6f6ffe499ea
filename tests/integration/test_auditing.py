"""Operating the reactor on the real services: the audit views and their documented queries, the
auditor role, retention, /metrics, and structured logs."""

from __future__ import annotations

import json
import re
import urllib.request
from pathlib import Path
from typing import Any

import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families
from psycopg.rows import dict_row

from reactor.devstack import claim_plans
from tests.support.e2e import conninfo, history, post, put, sql, wait_settled, write_rules
from tests.support.stack import (
    REPO_ROOT,
    BucketNames,
    MinioStack,
    ReactorProcess,
    ReactorSpawner,
    reactor_env,
    run_cli,
)

DOC = REPO_ROOT / "docs" / "auditing.md"


def doc_queries() -> list[str]:
    blocks = re.findall(r"```sql\n(.*?)```", DOC.read_text(encoding="utf-8"), flags=re.DOTALL)
    return [b for b in blocks if not b.lstrip().upper().startswith(("CREATE ROLE", "--"))]


@pytest.fixture
def scenario(
    tmp_path: Path, minio: MinioStack, database_url: str, buckets: BucketNames, spawn_reactor: ReactorSpawner
) -> ReactorProcess:
    """Three uploads of task t1 through the webhook, and one upload found only by the sweep."""
    src, dst, quiet = buckets("img"), buckets("alr"), buckets.make("qt")
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
        {
            "name": "quiet",
            "source_bucket": quiet,
            "pattern": "{f}",
            "target_bucket": dst,
            "target": "quiet/{f}",
        },
    )
    env = reactor_env(
        minio, database_url=database_url, rules_path=rules, env={"REACTOR_RECONCILE_GRACE": "0"}
    )
    run_cli(["setup"], env=env, check=True)
    minio.client().delete_bucket_notification(quiet)  # nobody tells the reactor about this bucket
    reactor = spawn_reactor(
        database_url=database_url, rules_path=rules, http_port=minio.webhook_port,
        env={"REACTOR_RECONCILE_INTERVAL": "0"},
    )  # fmt: skip
    client = minio.client()
    for name in ("cat.jpg", "dog.jpg", "owl.jpg"):
        put(client, src, f"detect/t1/{name}", name.encode() * 10)
    wait_settled(database_url, 3)
    put(client, quiet, "found.jpg", b"found")
    assert "enqueued 1" in run_cli(["reconcile"], env=env, check=True).stdout
    wait_settled(database_url, 4)
    return reactor


def test_documented_queries_answer_as_the_auditor_role(scenario: ReactorProcess, database_url: str) -> None:
    queries = doc_queries()
    assert len(queries) >= 7, "docs/auditing.md lost its example queries"
    results = []
    with psycopg.connect(conninfo(database_url), autocommit=True, row_factory=dict_row) as conn:
        conn.execute("SET ROLE reactor_auditor")
        for query in queries:
            results.append(conn.execute(query).fetchall())  # type: ignore[call-overload]
    where_is, timeline, task, stuck, retried, swept, raw = results[:7]
    assert [r["status"] for r in where_is] == ["done"]
    assert where_is[0]["target_key"] == "detect/t1/cat.jpg"
    assert [r["kind"] for r in timeline] == ["enqueued", "claimed", "done"]
    assert [r["seq"] for r in task] == [1, 2, 3]
    assert all(r["took"] is not None for r in task)
    assert stuck == []
    assert retried == []
    assert [r["source_key"] for r in swept] == ["found.jpg"]
    assert len(raw) == 3  # the webhook's moves keep their raw record; the sweep's has none
    assert {r["event_name"] for r in raw} == {"s3:ObjectCreated:Put"}


AUDITOR_REFUSED = (
    "SELECT * FROM reactor.moves",
    "SELECT * FROM reactor.move_events",
    "INSERT INTO reactor.order_keys (order_key) VALUES ('x')",
    "UPDATE reactor.moves SET status = 'failed'",
    "DELETE FROM reactor.move_events",
    "SELECT reactor.refresh_key('t1')",
    "CREATE TABLE reactor.mine (x int)",
    "DROP VIEW reactor.move_history",
)


def test_the_auditor_role_cannot_touch_anything_but_read_the_views(
    scenario: ReactorProcess, database_url: str
) -> None:
    with psycopg.connect(conninfo(database_url), autocommit=True) as conn:
        conn.execute("SET ROLE reactor_auditor")
        for statement in AUDITOR_REFUSED:
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(statement)  # type: ignore[arg-type]
        assert conn.execute("SELECT count(*) FROM reactor.move_history").fetchone() == (4,)
    assert len(history(database_url)) == 4


def test_pruning_removes_old_finished_moves_in_batches_and_keeps_the_claim_plan(
    scenario: ReactorProcess, minio: MinioStack, database_url: str
) -> None:
    # Given four finished moves, three of them finished ten days ago, and a blocked key
    sql(
        database_url,
        "UPDATE reactor.moves SET finished_at = now() - interval '10 days' WHERE rule = 'alerts'",
    )
    sql(
        database_url,
        "INSERT INTO reactor.order_keys (order_key, last_seq, head_seq) VALUES ('stuck', 1, 1);"
        "INSERT INTO reactor.moves (order_key, seq, rule, via, source_bucket, source_key, etag, size,"
        " target_bucket, target_key, status, blocking, finished_at) VALUES ('stuck', 1, 'alerts', 'webhook',"
        " 'b', 'k', 'e', 1, 't', 'k', 'failed', true, now() - interval '30 days')",
    )
    before = sql(database_url, "SELECT count(*) AS n FROM reactor.move_events")[0]["n"]
    plan_before = claim_plan(database_url)
    # When an operator prunes history older than five days, two moves per batch
    env = reactor_env(minio, database_url=database_url)
    result = run_cli(["prune", "--older-than", "5", "--batch", "2"], env=env, check=True)
    # Then exactly the three old finished moves went, with their events; the blocking one stayed
    assert "pruned 3" in result.stdout
    left = sql(database_url, "SELECT rule, blocking FROM reactor.moves ORDER BY id")
    assert left == [{"rule": "quiet", "blocking": False}, {"rule": "alerts", "blocking": True}]
    after = sql(database_url, "SELECT count(*) AS n FROM reactor.move_events")[0]["n"]
    assert after == before - 9  # enqueued, claimed, done for each pruned move
    # And the claim reads ready keys through its partial index, with the same plan as before
    # (tests/integration/test_outbox.py checks that plan on a large history)
    assert claim_plan(database_url) == plan_before
    assert ("Index Scan", "order_keys", "ix_order_keys_ready_at") in plan_before


def claim_plan(database_url: str) -> list[tuple[str, str, str]]:
    """The plan of the claim inside reactor.claim_moves as (node type, relation, index) triples."""
    nodes: list[tuple[str, str, str]] = []

    def walk(node: dict[str, Any]) -> None:
        nodes.append(
            (str(node["Node Type"]), str(node.get("Relation Name", "")), str(node.get("Index Name", "")))
        )
        for child in node.get("Plans", []):
            walk(child)

    walk(claim_plans(conninfo(database_url), limit=10, runs=1)[0])
    return nodes


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus text format (0 when absent, as for a fresh counter)."""
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return float(sample.value)
    return 0.0


def test_metrics_move_as_moves_happen(scenario: ReactorProcess, minio: MinioStack) -> None:
    with urllib.request.urlopen(scenario.url + "/metrics", timeout=5) as response:  # noqa: S310 - loopback
        before = response.read().decode()
    assert metric(before, "reactor_moves_finished_total", rule="alerts", status="done") == 3
    assert metric(before, "reactor_events_received_total", way="webhook", result="enqueued") == 3
    assert metric(before, "reactor_moves_pending") == 0
    assert metric(before, "reactor_database_up") == 1
    assert metric(before, "reactor_move_duration_seconds_count", rule="alerts", status="done") == 3
    # A refused body counts as rejected and is timed by status
    assert post(scenario.url + "/minio/events", b"nope", token=minio.webhook_token)[0] == 400
    with urllib.request.urlopen(scenario.url + "/metrics", timeout=5) as response:  # noqa: S310 - loopback
        after = response.read().decode()
    assert metric(after, "reactor_events_received_total", way="webhook", result="rejected") == 1
    assert metric(after, "reactor_webhook_request_duration_seconds_count", status="400") == 1
    assert minio.secret_key not in after
    assert minio.webhook_token not in after


def _is_json_object(line: str) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:
        return False


def test_logs_are_json_lines_with_move_fields_and_no_secrets(
    scenario: ReactorProcess, minio: MinioStack
) -> None:
    # (the test harness writes "=== <time> start: <command>" markers between process runs)
    lines = [
        line for line in scenario.log_text().splitlines() if line.strip() and not line.startswith("=== ")
    ]
    not_json = [line for line in lines if not _is_json_object(line)]
    assert not_json == [], "every log line must be one JSON object"
    records = [json.loads(line) for line in lines]
    moves = [r for r in records if r.get("event") == "move_done"]
    assert len(moves) == 4  # three from the webhook, one from the sweep
    for record in moves:
        assert {"move_id", "order_key", "seq", "source", "target", "timestamp", "level"} <= record.keys()
    log = scenario.log_text()
    assert minio.secret_key not in log
    assert minio.webhook_token not in log
