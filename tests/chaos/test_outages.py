"""Outages of MinIO during a load, on the real services: moves wait, retry, and all finish."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

import pytest

from reactor.devstack import free_port, minio_binary
from tests.support.e2e import history, put, sha256_of, wait_settled, write_rules
from tests.support.stack import MinioStack, ReactorSpawner, reactor_env, run_cli


@pytest.mark.parametrize(
    "outage",
    [pytest.param(6.0, id="6s"), pytest.param(30.0, id="30s", marks=pytest.mark.slow)],
)
def test_minio_stopped_during_a_load_delays_moves_but_fails_none(
    tmp_path: Path, database_url: str, spawn_reactor: ReactorSpawner, outage: float
) -> None:
    # Given a MinIO of our own (we stop it), its webhook queue pointing at one reactor
    root = Path(tempfile.mkdtemp(prefix="reactor-minio-outage-"))
    port = free_port()
    own = MinioStack(minio_binary(), root, webhook_port=port)
    own.start()
    try:
        rules = write_rules(
            tmp_path / "rules.toml",
            {
                "name": "alerts",
                "source_bucket": "outage-src",
                "pattern": "{task_type}/{task_id}/{filename}",
                "target_bucket": "outage-dst",
                "target": "{task_type}/{task_id}/{filename}",
                "order_key": "{task_id}",
            },
        )
        env = reactor_env(own, database_url=database_url, rules_path=rules)
        run_cli(["setup"], env=env, check=True)
        overrides = {k: env[k] for k in ("REACTOR_MINIO_ENDPOINT", "REACTOR_MINIO_ACCESS_KEY",
                                          "REACTOR_MINIO_SECRET_KEY", "REACTOR_NOTIFY_ARN")}  # fmt: skip
        reactor = spawn_reactor(database_url=database_url, rules_path=rules, http_port=port, env=overrides)
        client = own.client()
        digests = {}
        # When a load is under way and MinIO stops for the whole outage
        for i in range(60):
            key = f"det/t{i % 6}/{i:03d}.jpg"
            digests[key] = put(client, "outage-src", key, os.urandom(256 * 1024))
        own.stop()
        time.sleep(outage)
        assert reactor.alive, reactor.log_tail()
        own.start()
        # Then every move finishes, none failed, and the reactor paused instead of burning attempts
        rows = wait_settled(database_url, 60, timeout=180)
        assert {r["status"] for r in rows} == {"done"}, [r for r in rows if r["status"] != "done"]
        assert max(r["attempts"] for r in rows) < 5
        for key, digest in digests.items():
            assert sha256_of(client, "outage-dst", key) == digest
        assert reactor.alive
        log = reactor.log_text()
        if any(r["attempts"] > 1 for r in history(database_url)):
            assert "minio_unavailable_pausing_claims" in log
            assert "minio_available_resuming_claims" in log
    finally:
        own.stop()
        shutil.rmtree(root, ignore_errors=True)
