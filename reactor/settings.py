"""Every setting comes from REACTOR_* environment variables, validated once at start."""

from __future__ import annotations

import ipaddress
import os
import socket
from enum import StrEnum
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from reactor.errors import ConfigError


class OnFailure(StrEnum):
    """What a key does after one of its moves has failed for good."""

    CONTINUE = "continue"
    BLOCK = "block"


def _default_instance_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class Settings(BaseSettings):
    """The reactor's configuration; field names map to REACTOR_<NAME>."""

    model_config = SettingsConfigDict(env_prefix="REACTOR_", extra="ignore", frozen=True)

    database_url: SecretStr = SecretStr("postgresql+psycopg://postgres@127.0.0.1:5432/reactor")
    minio_endpoint: str = "127.0.0.1:9000"
    minio_access_key: str = "minioadmin"
    minio_secret_key: SecretStr = SecretStr("minioadmin")
    minio_secure: bool = False
    minio_ca_file: Path | None = None
    minio_region: str | None = None
    rules: Path | None = None
    http_addr: str = "127.0.0.1:8731"
    webhook_token: SecretStr | None = None
    allow_unauthenticated: bool = False
    webhook_max_body: int = Field(default=1024 * 1024, ge=1024)
    webhook_body_timeout: float = Field(default=10.0, gt=0.0, le=300.0)
    listen: bool = False
    concurrency: int = Field(default=8, ge=1, le=256)
    max_attempts: int = Field(default=5, ge=1, le=1000)
    on_failure: OnFailure = OnFailure.CONTINUE
    notify_arn: str | None = None
    instance_id: str = Field(default_factory=_default_instance_id, min_length=1, max_length=200)
    # A claim is a lease: a worker that stops renewing it (crash, kill -9, partition) loses the
    # move to another instance after lease_seconds; heartbeats renew every lease_seconds / 3.
    lease_seconds: float = Field(default=30.0, ge=1.0, le=3600.0)
    poll_interval: float = Field(default=1.0, gt=0.0, le=60.0)
    retry_base_delay: float = Field(default=1.0, ge=0.0, le=3600.0)
    retry_max_delay: float = Field(default=300.0, ge=0.0, le=86400.0)
    s3_timeout: float = Field(default=60.0, gt=0.0)
    # The sweep that catches uploads whose notification was lost; 0 turns the scheduled sweep off.
    reconcile_interval: float = Field(default=60.0, ge=0.0)
    reconcile_grace: float = Field(default=30.0, ge=0.0)
    # Finished moves older than this many days are pruned (hourly, one instance at a time);
    # unset keeps history forever.
    retention_days: float | None = Field(default=None, gt=0.0)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["json", "console"] = "json"

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_level(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    @field_validator("database_url")
    @classmethod
    def _psycopg_driver(cls, value: SecretStr) -> SecretStr:
        url = value.get_secret_value()
        for prefix in ("postgresql://", "postgres://"):
            if url.startswith(prefix):
                return SecretStr("postgresql+psycopg://" + url[len(prefix) :])
        if not url.startswith("postgresql+psycopg://"):
            raise ValueError("must be a PostgreSQL URL such as postgresql://user:password@host:5432/db")
        return value

    @field_validator("minio_ca_file", "rules", mode="before")
    @classmethod
    def _empty_path_is_unset(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("webhook_token")
    @classmethod
    def _token_not_empty(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not value.get_secret_value().strip():
            raise ValueError("must not be empty: unset it to run without a token (loopback only)")
        return value

    @field_validator("http_addr")
    @classmethod
    def _host_port(cls, value: str) -> str:
        split_host_port(value)
        return value

    @field_validator("minio_endpoint")
    @classmethod
    def _endpoint(cls, value: str) -> str:
        if "://" in value or "/" in value:
            raise ValueError("must be host:port without a scheme or path (use REACTOR_MINIO_SECURE for TLS)")
        return value

    @property
    def http_host(self) -> str:
        return split_host_port(self.http_addr)[0]

    @property
    def http_port(self) -> int:
        return split_host_port(self.http_addr)[1]

    @property
    def http_is_loopback(self) -> bool:
        host = self.http_host
        if host == "localhost":
            return True
        try:
            return ipaddress.ip_address(host).is_loopback
        except ValueError:
            return False

    def require_rules(self) -> Path:
        if self.rules is None:
            raise ConfigError(
                "REACTOR_RULES is not set: point it at a rules TOML file (see examples/rules.toml)"
            )
        return self.rules


def split_host_port(addr: str) -> tuple[str, int]:
    host, sep, port = addr.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError("must be HOST:PORT, for example 127.0.0.1:8731")
    return host.strip("[]"), int(port)


def load_settings() -> Settings:
    """Read the environment; a bad value becomes a ConfigError naming the variable, never its value."""
    try:
        return Settings()
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            name = "REACTOR_" + "_".join(str(p) for p in err["loc"]).upper()
            problems.append(f"{name}: {err['msg']}")
        raise ConfigError(
            "invalid configuration: " + "; ".join(problems) + ". Fix the environment variable and restart."
        ) from None
