"""The migrations against the models and the real PostgreSQL: no drift, concurrent starts, a clean
downgrade, and the public faces (the move_history view, the status enum)."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Column, Connection, Engine, MetaData, Table, Text, create_engine, pool, text

from reactor.devstack import PostgresServer
from reactor.domain import MoveStatus
from reactor.migrate import alembic_config
from reactor.schema import SCHEMA, metadata
from tests.support.stack import base_env, run_cli, session_stack

PUBLIC_HISTORY_COLUMNS = [
    "move_id",
    "order_key",
    "seq",
    "rule",
    "source_bucket",
    "source_key",
    "source_version_id",
    "etag",
    "size",
    "target_bucket",
    "target_key",
    "status",
    "attempts",
    "last_error",
    "enqueued_at",
    "started_at",
    "finished_at",
    "worker",
]


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    """An unpooled engine on this test's fresh (migrated) database."""
    engine = create_engine(database_url, poolclass=pool.NullPool)
    yield engine
    engine.dispose()


def head_revision(database_url: str) -> str:
    head = ScriptDirectory.from_config(alembic_config(database_url)).get_current_head()
    assert head is not None
    return head


def versions(conn: Connection) -> list[str]:
    return list(conn.execute(text("SELECT version_num FROM reactor.alembic_version")).scalars())


def _include_name(name: str | None, type_: str, _parent: object) -> bool:
    return name == SCHEMA if type_ == "schema" else True


def diff(conn: Connection, target: MetaData) -> list[Any]:
    """What autogenerate would write to bring the database to `target`, as migrations/env.py runs it."""
    context = MigrationContext.configure(
        conn,
        opts={
            "include_schemas": True,
            "include_name": _include_name,
            "compare_type": True,
            "version_table_schema": SCHEMA,
            "target_metadata": target,
        },
    )
    return list(compare_metadata(context, target))


def reactor_objects(conn: Connection) -> dict[str, set[str]]:
    """Every relation, function and type in the reactor schema, by kind."""
    relations = conn.execute(
        text("SELECT relname FROM pg_class WHERE relnamespace = 'reactor'::regnamespace")
    ).scalars()
    functions = conn.execute(
        text("SELECT proname FROM pg_proc WHERE pronamespace = 'reactor'::regnamespace")
    ).scalars()
    types = conn.execute(
        text("SELECT typname FROM pg_type WHERE typnamespace = 'reactor'::regnamespace")
    ).scalars()
    return {"relations": set(relations), "functions": set(functions), "types": set(types)}


def test_the_migrated_schema_matches_the_models(engine: Engine) -> None:
    # Given a database migrated to head (a copy of the session's template)
    with engine.connect() as conn:
        # When autogenerate compares it with reactor.schema.metadata
        differences = diff(conn, metadata)

    # Then there is nothing to generate
    assert differences == []


def test_the_model_compare_does_see_the_reactor_schema(engine: Engine) -> None:
    # Given the models plus one table the database lacks (guards against a compare that filters out
    # everything and so passes vacuously)
    extended = MetaData(schema=SCHEMA)
    for table in metadata.tables.values():
        table.to_metadata(extended)
    Table("canary", extended, Column("id", Text, primary_key=True))

    # When autogenerate compares
    with engine.connect() as conn:
        differences = diff(conn, extended)

    # Then it reports exactly that table as missing
    assert [(d[0], d[1].schema, d[1].name) for d in differences] == [("add_table", SCHEMA, "canary")]


def test_concurrent_migrate_commands_on_an_empty_database_all_succeed(pg: PostgresServer) -> None:
    # Given an empty database, and three instances starting at once, each running `reactor migrate`
    # (only REACTOR_DATABASE_URL matters to migrate, so no MinIO settings are needed)
    name = session_stack().next_database_name()
    pg.create_database(name)
    try:
        url = pg.url(name)
        env = {**base_env(), "REACTOR_DATABASE_URL": url}

        # When they run concurrently
        with ThreadPoolExecutor(max_workers=3) as threads:
            results = list(threads.map(lambda _: run_cli(["migrate"], env=env, timeout=60), range(3)))

        # Then every one exits 0, and the database is at head exactly once
        for result in results:
            assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
            assert "database schema is up to date" in result.stdout
        engine = create_engine(url, poolclass=pool.NullPool)
        try:
            with engine.connect() as conn:
                assert versions(conn) == [head_revision(url)]
                assert {"order_keys", "moves", "move_events", "move_history"} <= reactor_objects(conn)[
                    "relations"
                ]
        finally:
            engine.dispose()
    finally:
        pg.drop_database(name)


def test_downgrade_to_base_removes_everything_and_upgrade_restores_it(
    database_url: str, engine: Engine
) -> None:
    # Given a database at head
    config = alembic_config(database_url)
    with engine.connect() as conn:
        at_head = reactor_objects(conn)
    assert {"refresh_key", "finish_move", "recover_expired", "forbid_update"} <= at_head["functions"]
    assert "move_status" in at_head["types"]

    # When it is downgraded to base
    command.downgrade(config, "base")

    # Then only the schema and alembic's (empty) version table are left
    with engine.connect() as conn:
        after_downgrade = reactor_objects(conn)
        assert versions(conn) == []
    assert after_downgrade == {
        "relations": {"alembic_version", "alembic_version_pkc"},
        "functions": set(),
        "types": {"alembic_version", "_alembic_version"},  # the table's row type and its array
    }

    # When it is upgraded again
    command.upgrade(config, "head")

    # Then every object is back, at head, and the models still match
    with engine.connect() as conn:
        assert reactor_objects(conn) == at_head
        assert versions(conn) == [head_revision(database_url)]
        assert diff(conn, metadata) == []


def test_move_history_exposes_the_public_columns_in_order(engine: Engine) -> None:
    # Given the migrated view
    with engine.connect() as conn:
        # When its columns are listed
        columns = list(
            conn.execute(
                text(
                    "SELECT column_name FROM information_schema.columns"
                    " WHERE table_schema = 'reactor' AND table_name = 'move_history'"
                    " ORDER BY ordinal_position"
                )
            ).scalars()
        )

    # Then every public column is there, in the documented order (extra columns may follow)
    assert columns[: len(PUBLIC_HISTORY_COLUMNS)] == PUBLIC_HISTORY_COLUMNS


def test_move_history_shows_an_unversioned_upload_without_a_version_id(engine: Engine) -> None:
    # Given a move of an unversioned upload (stored as '')
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO reactor.order_keys (order_key, last_seq) VALUES ('K', 1)"))
        conn.execute(
            text(
                "INSERT INTO reactor.moves (order_key, seq, rule, via, source_bucket, source_key, etag, size,"
                " target_bucket, target_key) VALUES ('K', 1, 'r', 'webhook', 'src', 'a', 'e', 5, 'dst', 'b')"
            )
        )

    # When it is read through the view
    with engine.connect() as conn:
        row = conn.execute(text("SELECT * FROM reactor.move_history")).mappings().one()

    # Then its version is NULL and its status plain text
    assert row["source_version_id"] is None
    assert (row["order_key"], row["seq"], row["status"], row["size"]) == ("K", 1, "pending", 5)


def test_the_status_enum_in_sql_equals_the_domain_enum(engine: Engine) -> None:
    # Given the migrated enum type
    with engine.connect() as conn:
        # When its labels are read in their declared order
        labels = list(
            conn.execute(
                text(
                    "SELECT enumlabel FROM pg_enum WHERE enumtypid = 'reactor.move_status'::regtype"
                    " ORDER BY enumsortorder"
                )
            ).scalars()
        )

    # Then they are MoveStatus's values, in MoveStatus's order
    assert labels == [status.value for status in MoveStatus]
