"""Chaos tests: the integration fixtures (same session services), plus processes killed on purpose."""

from tests.support.stack import (
    buckets,
    database_url,
    minio,
    pg,
    pytest_runtest_makereport,
    pytest_sessionfinish,
    pytest_terminal_summary,
    reactor_env_for,
    spawn_reactor,
    template_database,
)

__all__ = [
    "buckets",
    "database_url",
    "minio",
    "pg",
    "pytest_runtest_makereport",
    "pytest_sessionfinish",
    "pytest_terminal_summary",
    "reactor_env_for",
    "spawn_reactor",
    "template_database",
]
