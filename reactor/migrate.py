"""Schema migrations through Alembic, safe to run from several instances at once."""

from __future__ import annotations

import os
from pathlib import Path

from alembic import command
from alembic.config import Config

from reactor.errors import ConfigError


def migrations_dir() -> Path:
    """Find migrations/: REACTOR_MIGRATIONS_DIR, the source checkout, or the working directory."""
    candidates = [
        os.environ.get("REACTOR_MIGRATIONS_DIR"),
        str(Path(__file__).resolve().parent.parent / "migrations"),
        str(Path.cwd() / "migrations"),
    ]
    for candidate in candidates:
        if candidate and (Path(candidate) / "env.py").is_file():
            return Path(candidate)
    raise ConfigError(
        "cannot find the migrations folder: set REACTOR_MIGRATIONS_DIR to the project's migrations/ directory"
    )


def alembic_config(database_url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(migrations_dir()))
    # ConfigParser interpolation would eat '%' in passwords.
    config.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))
    return config


def upgrade(database_url: str, revision: str = "head") -> None:
    """Bring the database to `revision`; concurrent callers serialize on an advisory lock."""
    command.upgrade(alembic_config(database_url), revision)
