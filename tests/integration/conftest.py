"""Integration tests run against a real PostgreSQL and a real MinIO, started once per session."""

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
