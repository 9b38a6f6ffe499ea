"""Helpers shared by the integration and chaos suites: the test stack (real PostgreSQL and MinIO)."""

from tests.support.stack import (
    WEBHOOK_TOKEN,
    BucketNames,
    MinioStack,
    ReactorEnvFactory,
    ReactorProcess,
    ReactorSpawner,
    SessionStack,
    base_env,
    reactor_env,
    run_cli,
    session_stack,
)

__all__ = [
    "WEBHOOK_TOKEN",
    "BucketNames",
    "MinioStack",
    "ReactorEnvFactory",
    "ReactorProcess",
    "ReactorSpawner",
    "SessionStack",
    "base_env",
    "reactor_env",
    "run_cli",
    "session_stack",
]
