"""The minimal PostgreSQL grants of docs/security.md, applied as written: the service role runs the outbox,
the CLI and a whole reactor, and is refused everything else.

Roles are cluster-wide, so each test makes its own (a unique name) and drops it afterwards.
"""

from __future__ import annotations

import re
import secrets
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
from psycopg import sql as pgsql
from sqlalchemy import Engine, text
from sqlalchemy.engine import make_url

from reactor.devstack import REPO_ROOT
from reactor.domain import MoveStatus, Upload
from reactor.outbox import Finish, NewMove, Outbox, make_engine
from tests.support.e2e import conninfo, history, put, sha256_of, sql, wait_settled, write_rules
from tests.support.stack import BucketNames, MinioStack, ReactorSpawner, base_env, reactor_env, run_cli

DOC = REPO_ROOT / "docs" / "security.md"
DOC_ROLE = "reactor_service"


def doc_block(marker: str) -> str:
    """The ```sql block of docs/security.md that contains marker."""
    blocks = re.findall(r"```sql\n(.*?)```", DOC.read_text(encoding="utf-8"), flags=re.DOTALL)
    found = [b for b in blocks if marker in b]
    assert len(found) == 1, f"docs/security.md: expected one sql block with {marker!r}, found {len(found)}"
    return str(found[0])


def as_role(block: str, role: str) -> str:
    return re.sub(rf"\b{DOC_ROLE}\b", role, block)


@dataclass(frozen=True)
class ServiceRole:
    name: str
    url: str  # SQLAlchemy URL of the test database, as this role
    admin_url: str  # the same database as the superuser

    def grant(self, marker: str) -> None:
        with psycopg.connect(conninfo(self.admin_url), autocommit=True) as conn:
            conn.execute(as_role(doc_block(marker), self.name).encode())


@pytest.fixture
def service_role(database_url: str) -> Iterator[ServiceRole]:
    """A LOGIN role with exactly the documented grants on this test's database (trust auth: no password
    is checked on the test server); all of its grants and the role itself are dropped afterwards."""
    name = f"reactor_svc_{secrets.token_hex(4)}"
    role = ServiceRole(
        name=name,
        url=make_url(database_url).set(username=name).render_as_string(hide_password=False),
        admin_url=database_url,
    )
    role.grant("GRANT USAGE ON SCHEMA reactor TO reactor_service")
    role.grant("REVOKE EXECUTE ON ALL FUNCTIONS IN SCHEMA reactor FROM PUBLIC")  # only the explicit list
    try:
        yield role
    finally:
        with psycopg.connect(conninfo(database_url), autocommit=True) as conn:
            conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s", (name,))
            conn.execute(pgsql.SQL("DROP OWNED BY {}").format(pgsql.Identifier(name)))
            conn.execute(pgsql.SQL("DROP ROLE {}").format(pgsql.Identifier(name)))


@pytest.fixture
def engine(service_role: ServiceRole) -> Iterator[Engine]:
    engine = make_engine(service_role.url, pool_size=4)
    yield engine
    engine.dispose()


def new_move(key: str, order_key: str) -> NewMove:
    return NewMove(
        upload=Upload(bucket="src", key=key, etag=uuid.uuid4().hex, size=3),
        rule="r",
        order_key=order_key,
        target_bucket="dst",
        target_key=f"moved/{key}",
        via="webhook",
    )


def test_the_service_role_runs_every_outbox_operation(engine: Engine) -> None:
    outbox = Outbox(engine)
    with engine.connect() as conn:
        assert conn.execute(text("SELECT current_user")).scalar_one().startswith("reactor_svc_")
    outbox.ping()
    # enqueue (order_keys upsert, moves insert, move_events insert, pg_notify) and its dedup
    first = outbox.enqueue(new_move("a.jpg", "t1"), worker="w")
    assert (first.move_id, first.seq) != (None, None)
    assert outbox.enqueue(new_move("b.jpg", "t1"), worker="w").seq == 2
    # claim, heartbeat, checkpoint, finish (reactor.finish_move -> reactor.refresh_key)
    (claimed,) = outbox.claim(10, worker="w", lease_seconds=30)
    assert outbox.renew({claimed.id: claimed.lease_token}, lease_seconds=30) == {claimed.id}
    assert outbox.checkpoint(claimed, "etag-1")
    assert outbox.finish(claimed, Finish(status=MoveStatus.DONE, kind="done"), worker="w")
    # a failure, then a retry by hand (lock_key, retry_move, refresh_key)
    (second,) = outbox.claim(10, worker="w", lease_seconds=30)
    assert outbox.finish(second, Finish(status=MoveStatus.FAILED, kind="failed", error="boom"), worker="w")
    assert outbox.failed_move_ids() == [second.id]
    assert outbox.retry([second.id], worker="w") == [second.id]
    # lease recovery (reactor.recover_expired)
    (again,) = outbox.claim(10, worker="w", lease_seconds=1)
    with engine.begin() as conn:  # let the lease lapse without waiting for it
        conn.execute(
            text("UPDATE reactor.moves SET lease_expires_at = now() - interval '1 s' WHERE id = :id"),
            {"id": again.id},
        )
    assert outbox.recover_expired(worker="w", max_attempts=5, block=False) == 1
    with engine.connect() as conn:
        kinds = conn.execute(text("SELECT kind FROM reactor.move_events ORDER BY id")).scalars().all()
        statuses = (
            conn.execute(text("SELECT status FROM reactor.move_history ORDER BY move_id")).scalars().all()
        )
    assert kinds == [
        "enqueued", "enqueued", "claimed", "done", "claimed", "failed", "retried", "claimed", "lease_expired"
    ]  # fmt: skip
    assert statuses == ["done", "pending"]


@pytest.mark.parametrize(
    "statement",
    [
        "UPDATE reactor.move_events SET kind = 'forged'",
        "DELETE FROM reactor.move_events",
        "DELETE FROM reactor.moves",
        "TRUNCATE reactor.moves",
        "DROP TABLE reactor.moves",
        "DROP TABLE reactor.move_events",
        "DROP VIEW reactor.move_history",
        "ALTER TABLE reactor.moves ADD COLUMN mine int",
        "CREATE TABLE reactor.mine (x int)",
        "CREATE FUNCTION reactor.mine() RETURNS int LANGUAGE sql AS 'SELECT 1'",
        "DROP TRIGGER move_events_append_only ON reactor.move_events",
        "UPDATE reactor.alembic_version SET version_num = 'x'",
        "SELECT reactor.forbid_update()",
    ],
)
def test_the_service_role_cannot_rewrite_history_or_change_the_schema(
    engine: Engine, service_role: ServiceRole, statement: str
) -> None:
    Outbox(engine).enqueue(new_move("a.jpg", "t1"), worker="w")
    with (
        psycopg.connect(conninfo(service_role.url), autocommit=True) as conn,
        pytest.raises(psycopg.errors.InsufficientPrivilege),
    ):
        conn.execute(statement.encode())
    rows = sql(service_role.admin_url, "SELECT kind FROM reactor.move_events")
    assert rows == [{"kind": "enqueued"}]


def test_reactor_migrate_needs_the_owner_role(service_role: ServiceRole) -> None:
    env = reactor_env_without_minio(service_role.url)
    result = run_cli(["migrate"], env=env, timeout=60)
    assert result.returncode != 0
    assert "permission denied" in result.stderr
    # and it changed nothing
    assert sql(service_role.admin_url, "SELECT version_num FROM reactor.alembic_version") != []


def reactor_env_without_minio(database_url: str) -> dict[str, str]:
    env = base_env()
    env["REACTOR_DATABASE_URL"] = database_url
    return env


def test_with_retention_the_role_deletes_finished_moves_and_their_events_go_with_them(
    engine: Engine, service_role: ServiceRole
) -> None:
    outbox = Outbox(engine)
    outbox.enqueue(new_move("a.jpg", "t1"), worker="w")
    (claimed,) = outbox.claim(10, worker="w", lease_seconds=30)
    outbox.finish(claimed, Finish(status=MoveStatus.DONE, kind="done"), worker="w")
    service_role.grant("GRANT DELETE ON reactor.moves TO reactor_service")
    with engine.begin() as conn:
        deleted = conn.execute(text("DELETE FROM reactor.moves WHERE finished_at IS NOT NULL")).rowcount
    assert deleted == 1
    assert sql(service_role.admin_url, "SELECT count(*) AS n FROM reactor.move_events") == [{"n": 0}]
    with (
        psycopg.connect(conninfo(service_role.url), autocommit=True) as conn,
        pytest.raises(psycopg.errors.InsufficientPrivilege),
    ):
        conn.execute(b"DELETE FROM reactor.move_events")


def test_a_reactor_and_its_cli_run_end_to_end_as_the_service_role(
    tmp_path: Path,
    minio: MinioStack,
    service_role: ServiceRole,
    buckets: BucketNames,
    spawn_reactor: ReactorSpawner,
) -> None:
    src, dst = buckets("svc-img"), buckets("svc-alr")
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
    env = reactor_env(
        minio, database_url=service_role.url, rules_path=rules, env={"REACTOR_RECONCILE_GRACE": "0"}
    )
    run_cli(["setup"], env=env, check=True)
    reactor = spawn_reactor(
        database_url=service_role.url,
        rules_path=rules,
        http_port=minio.webhook_port,
        env={"REACTOR_RECONCILE_INTERVAL": "1", "REACTOR_RECONCILE_GRACE": "0"},
    )
    client = minio.client()
    digests = {
        f"d/t{i % 2}/{i}.jpg": put(client, src, f"d/t{i % 2}/{i}.jpg", f"bytes {i}".encode())
        for i in range(6)
    }
    rows = wait_settled(service_role.admin_url, 6)
    assert {r["status"] for r in rows} == {"done"}
    for key, digest in digests.items():
        assert sha256_of(client, dst, key) == digest
    for args in (["status"], ["history"], ["reconcile"], ["retry", "--failed"]):
        result = run_cli(args, env=env, timeout=60)
        assert result.returncode == 0, (args, result.stderr)
        assert "permission denied" not in result.stderr
    log = reactor.log_text()
    for problem in ("permission denied", "InsufficientPrivilege", "Traceback", "reconcile_failed"):
        assert problem not in log, problem
    assert len(history(service_role.admin_url)) == 6
