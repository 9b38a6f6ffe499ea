"""Alembic environment: URL from `reactor migrate` (or settings), serialized by an advisory lock."""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine, pool, text

from reactor.schema import SCHEMA, metadata

# Any instance may run `reactor migrate` at start; the lock makes the second one wait and then
# find nothing to do, instead of racing the first on CREATE statements.
MIGRATION_LOCK_ID = 727_001


def _url() -> str:
    url = context.config.get_main_option("sqlalchemy.url")
    if url:
        return url
    from reactor.settings import load_settings

    return load_settings().database_url.get_secret_value()


def _include_name(name: str | None, type_: str, _parent: object) -> bool:
    return name == SCHEMA if type_ == "schema" else True


def run_migrations_online() -> None:
    engine = create_engine(_url(), poolclass=pool.NullPool)
    with engine.connect() as connection:
        connection.execute(text("SELECT pg_advisory_lock(:id)"), {"id": MIGRATION_LOCK_ID})
        try:
            connection.execute(text(f"CREATE SCHEMA IF NOT EXISTS {SCHEMA}"))
            connection.commit()
            context.configure(
                connection=connection,
                target_metadata=metadata,
                version_table_schema=SCHEMA,
                include_schemas=True,
                include_name=_include_name,
                compare_type=True,
            )
            with context.begin_transaction():
                context.run_migrations()
            connection.commit()
        finally:
            # A failed migration leaves the transaction aborted: roll back first, or the unlock
            # fails too and hides the real error.
            connection.rollback()
            connection.execute(text("SELECT pg_advisory_unlock(:id)"), {"id": MIGRATION_LOCK_ID})
            connection.commit()
    engine.dispose()


if context.is_offline_mode():
    raise SystemExit("offline migrations are not supported: run `reactor migrate` against the database")
run_migrations_online()
