"""docker/: the Dockerfile and compose.yaml agree with the Makefile, the settings and each other.

No Docker engine is needed: both files are parsed and cross-checked, so a renamed setting, a moved port or
a new MinIO pin fails here instead of in someone's `docker compose up`.
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from reactor.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
DOCKER_DIR = ROOT / "docker"
DOCKERFILE = DOCKER_DIR / "Dockerfile"
COMPOSE = DOCKER_DIR / "compose.yaml"
MAKEFILE = ROOT / "Makefile"
DOCKERIGNORE = ROOT / ".dockerignore"

# Read straight from the environment by reactor/migrate.py, not a Settings field.
EXTRA_REACTOR_ENV = frozenset({"REACTOR_MIGRATIONS_DIR"})
WEBHOOK_PATH = "/minio/events"
HEALTH_PATH = "/healthz"
WEBHOOK_ENV_PREFIX = "MINIO_NOTIFY_WEBHOOK_"
ROOT_USERS = frozenset({"root", "0"})

# Keys of the Compose specification (compose-spec/schema/compose-spec.json), for the parts this file uses.
TOP_LEVEL_KEYS = frozenset(
    {"version", "name", "include", "services", "models", "networks", "volumes", "secrets", "configs"}
)
SERVICE_KEYS = frozenset(
    {
        "develop", "deploy", "annotations", "attach", "build", "blkio_config", "cap_add", "cap_drop",
        "cgroup", "cgroup_parent", "command", "configs", "container_name", "cpu_count", "cpu_percent",
        "cpu_shares", "cpu_quota", "cpu_period", "cpu_rt_period", "cpu_rt_runtime", "cpus", "cpuset",
        "credential_spec", "depends_on", "device_cgroup_rules", "devices", "dns", "dns_opt", "dns_search",
        "domainname", "entrypoint", "env_file", "label_file", "environment", "expose", "extends",
        "provider", "external_links", "extra_hosts", "gpus", "group_add", "healthcheck", "hostname",
        "image", "init", "ipc", "isolation", "labels", "links", "logging", "mac_address", "mem_limit",
        "mem_reservation", "mem_swappiness", "memswap_limit", "network_mode", "models", "networks",
        "oom_kill_disable", "oom_score_adj", "pid", "pids_limit", "platform", "ports", "post_start",
        "pre_stop", "privileged", "profiles", "pull_policy", "pull_refresh_after", "read_only", "restart",
        "runtime", "scale", "security_opt", "shm_size", "secrets", "sysctls", "stdin_open",
        "stop_grace_period", "stop_signal", "storage_opt", "tmpfs", "tty", "ulimits", "use_api_socket",
        "user", "uts", "userns_mode", "volumes", "volumes_from", "working_dir",
    }
)  # fmt: skip
BUILD_KEYS = frozenset(
    {
        "context", "dockerfile", "dockerfile_inline", "entitlements", "args", "ssh", "labels",
        "cache_from", "cache_to", "no_cache", "additional_contexts", "network", "pull", "target",
        "shm_size", "extra_hosts", "isolation", "privileged", "secrets", "tags", "ulimits", "platforms",
    }
)  # fmt: skip
HEALTHCHECK_KEYS = frozenset(
    {"disable", "interval", "retries", "test", "timeout", "start_period", "start_interval"}
)
DEPLOY_KEYS = frozenset(
    {
        "mode", "endpoint_mode", "replicas", "labels", "rollback_config", "update_config", "resources",
        "restart_policy", "placement",
    }
)  # fmt: skip
DEPENDS_ON_KEYS = frozenset({"restart", "required", "condition"})
DEPENDS_ON_CONDITIONS = frozenset({"service_started", "service_healthy", "service_completed_successfully"})
RESTART_POLICIES = frozenset({"no", "always", "on-failure", "unless-stopped"})


# --------------------------------------------------------------------------------------------------
# A small Dockerfile parser: logical lines (continuations joined, comments dropped), split into stages.


@dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str
    line: int


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def last(self, keyword: str) -> Instruction | None:
        found = self.all(keyword)
        return found[-1] if found else None

    def env(self) -> dict[str, str]:
        values: dict[str, str] = {}
        for instruction in self.all("ENV"):
            values.update(parse_env(instruction.args))
        return values


@dataclass
class Dockerfile:
    global_args: list[Instruction]
    stages: list[Stage]

    @property
    def final(self) -> Stage:
        return self.stages[-1]

    def stage(self, name: str) -> Stage | None:
        return next((s for s in self.stages if s.name == name), None)


def logical_lines(text: str) -> list[tuple[int, str]]:
    """(first line number, instruction text): backslash continuations joined, comment lines skipped
    (Docker drops comment lines inside a continuation too)."""
    result: list[tuple[int, str]] = []
    parts: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), start=1):
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if not parts:
            start = number
        if stripped.endswith("\\"):
            parts.append(stripped[:-1].strip())
            continue
        parts.append(stripped)
        result.append((start, " ".join(p for p in parts if p)))
        parts = []
    if parts:
        result.append((start, " ".join(p for p in parts if p)))
    return result


def parse_dockerfile(text: str) -> Dockerfile:
    parsed = Dockerfile(global_args=[], stages=[])
    for number, line in logical_lines(text):
        keyword, _, args = line.partition(" ")
        instruction = Instruction(keyword=keyword.upper(), args=args.strip(), line=number)
        if instruction.keyword == "FROM":
            words = [w for w in instruction.args.split() if not w.startswith("--")]
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            parsed.stages.append(Stage(base=words[0], name=name))
        elif parsed.stages:
            parsed.stages[-1].instructions.append(instruction)
        else:
            parsed.global_args.append(instruction)
    return parsed


def parse_env(args: str) -> dict[str, str]:
    words = shlex.split(args)
    if words and "=" not in words[0]:  # legacy form: ENV KEY value with spaces
        return {words[0]: " ".join(words[1:])}
    return dict(word.split("=", 1) for word in words)


def split_flags(args: str) -> tuple[list[str], list[str]]:
    """(--flags, operands) of a COPY/ADD, shell or JSON form."""
    words = shlex.split(args)
    flags = [w for w in words if w.startswith("--")]
    operands = [w for w in words if not w.startswith("--")]
    rest = args[len(" ".join(flags)) :].strip() if flags else args.strip()
    if rest.startswith("["):
        operands = [str(item) for item in json.loads(rest)]
    return flags, operands


def arg_defaults(instructions: list[Instruction], name: str) -> list[str]:
    defaults = []
    for instruction in instructions:
        if instruction.keyword == "ARG":
            key, sep, value = instruction.args.partition("=")
            if key.strip() == name and sep:
                defaults.append(value.strip().strip("\"'"))
    return defaults


def port_of(addr: str) -> int:
    _, _, port = addr.rpartition(":")
    assert port.isdigit(), f"{addr!r} is not HOST:PORT: write it as 0.0.0.0:8731"
    return int(port)


def exposed_ports(stage: Stage) -> set[int]:
    ports: set[int] = set()
    for instruction in stage.all("EXPOSE"):
        ports.update(int(word.split("/")[0]) for word in instruction.args.split())
    return ports


# --------------------------------------------------------------------------------------------------
# Compose helpers


def environment(service: dict[str, Any]) -> dict[str, str]:
    """A service's environment as strings, from the mapping or the KEY=VALUE list form."""
    raw = service.get("environment") or {}
    if isinstance(raw, list):
        pairs = (str(item).partition("=") for item in raw)
        return {key: value for key, _, value in pairs}
    return {str(k): "" if v is None else str(v) for k, v in raw.items()}


def words_of(command: Any) -> list[str]:
    """A compose command/entrypoint/healthcheck test as a word list (a string is split like a shell)."""
    if command is None:
        return []
    if isinstance(command, str):
        return shlex.split(command)
    return [str(word) for word in command]


def volume_targets(service: dict[str, Any]) -> dict[str, str]:
    """Container path -> source (named volume or host path), short and long syntax."""
    targets: dict[str, str] = {}
    for volume in service.get("volumes") or []:
        if isinstance(volume, str):
            source, _, rest = volume.partition(":")
            target = rest.split(":")[0] if rest else source
            targets[target] = source if rest else ""
        else:
            targets[str(volume["target"])] = str(volume.get("source", ""))
    return targets


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    loaded = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(loaded, dict), f"{COMPOSE} must be a YAML mapping with a services: key"
    return loaded


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    found = compose.get("services")
    assert isinstance(found, dict), f"{COMPOSE}: add a services: mapping"
    for name in ("postgres", "minio", "reactor-init", "reactor"):
        assert isinstance(found.get(name), dict), f"{COMPOSE}: define the service {name!r}"
    return found


@pytest.fixture(scope="module")
def dockerfile() -> Dockerfile:
    parsed = parse_dockerfile(DOCKERFILE.read_text())
    assert parsed.stages, f"{DOCKERFILE}: no FROM found"
    return parsed


@pytest.fixture(scope="module")
def minio_pin() -> str:
    match = re.search(r"^MINIO_VERSION\s*:=\s*(\S+)\s*$", MAKEFILE.read_text(), re.MULTILINE)
    assert match, f"{MAKEFILE}: keep the line `MINIO_VERSION := <version>` (the one place MinIO is pinned)"
    return match.group(1)


# --------------------------------------------------------------------------------------------------
# The parser itself


def test_parser_joins_continuations_and_skips_comments() -> None:
    text = (
        "# syntax=docker/dockerfile:1\n"
        "ARG BASE=debian\n"
        "FROM golang:1.24 AS build\n"
        "RUN a \\\n"
        "    # a comment inside a continuation\n"
        "    && b\n"
        "FROM ${BASE}\n"
        'ENV A=1 B="two words"\n'
        'COPY --chown=1:1 ["x y", "/dst/"]\n'
        "USER 10001:10001\n"
    )
    parsed = parse_dockerfile(text)
    assert [i.args for i in parsed.global_args] == ["BASE=debian"]
    assert [s.name for s in parsed.stages] == ["build", None]
    assert parsed.stages[0].instructions == [Instruction(keyword="RUN", args="a && b", line=4)]
    assert parsed.final.env() == {"A": "1", "B": "two words"}
    copy = parsed.final.last("COPY")
    assert copy is not None
    assert split_flags(copy.args) == (["--chown=1:1"], ["x y", "/dst/"])


# --------------------------------------------------------------------------------------------------
# compose.yaml


def test_compose_uses_only_keys_of_the_compose_spec(compose: dict[str, Any]) -> None:
    unknown = {k for k in compose if k not in TOP_LEVEL_KEYS and not str(k).startswith("x-")}
    assert not unknown, f"{COMPOSE}: {sorted(unknown)} are not top-level Compose keys (prefix extensions x-)"
    declared_volumes = set(compose.get("volumes") or {})
    for name, service in compose["services"].items():
        where = f"{COMPOSE}: service {name}"
        unknown = {k for k in service if k not in SERVICE_KEYS and not k.startswith("x-")}
        assert not unknown, f"{where}: {sorted(unknown)} are not Compose service keys"
        build = service.get("build")
        if isinstance(build, dict):
            assert set(build) <= BUILD_KEYS, (
                f"{where}: build has unknown keys {sorted(set(build) - BUILD_KEYS)}"
            )
        health = service.get("healthcheck") or {}
        assert set(health) <= HEALTHCHECK_KEYS, (
            f"{where}: healthcheck has unknown keys {sorted(set(health) - HEALTHCHECK_KEYS)}"
        )
        deploy = service.get("deploy") or {}
        assert set(deploy) <= DEPLOY_KEYS, (
            f"{where}: deploy has unknown keys {sorted(set(deploy) - DEPLOY_KEYS)}"
        )
        restart = service.get("restart")
        assert restart is None or restart in RESTART_POLICIES, (
            f'{where}: restart must be one of {sorted(RESTART_POLICIES)} (quote "no": bare no is false)'
        )
        depends = service.get("depends_on") or {}
        for dependency, spec in depends.items() if isinstance(depends, dict) else []:
            assert dependency in compose["services"], f"{where}: depends_on names no service {dependency!r}"
            assert set(spec) <= DEPENDS_ON_KEYS, f"{where}: depends_on.{dependency} has unknown keys"
            assert spec.get("condition") in DEPENDS_ON_CONDITIONS, (
                f"{where}: depends_on.{dependency}.condition must be one of {sorted(DEPENDS_ON_CONDITIONS)}"
            )
        for target, source in volume_targets(service).items():
            if source and not source.startswith((".", "/", "~", "$")):
                assert source in declared_volumes, (
                    f"{where}: volume {source!r} (for {target}) must be declared under top-level volumes:"
                )


def test_every_reactor_variable_is_a_setting(
    services: dict[str, dict[str, Any]], dockerfile: Dockerfile
) -> None:
    known = {f"REACTOR_{name.upper()}" for name in Settings.model_fields} | EXTRA_REACTOR_ENV
    used = {(f"service {name}", key) for name, service in services.items() for key in environment(service)}
    used |= {(f"Dockerfile stage {stage.name}", key) for stage in dockerfile.stages for key in stage.env()}
    unknown = sorted((where, key) for where, key in used if key.startswith("REACTOR_") and key not in known)
    assert not unknown, (
        f"{unknown}: not read by the reactor; use a field of reactor.settings.Settings (REACTOR_ + its name "
        "in upper case) or fix the spelling"
    )


def test_minio_version_is_the_makefile_pin(
    services: dict[str, dict[str, Any]], dockerfile: Dockerfile, minio_pin: str
) -> None:
    build = services["minio"].get("build")
    assert isinstance(build, dict), f"{COMPOSE}: minio must be built (build: with target minio)"
    args = build.get("args") or {}
    if isinstance(args, list):
        args = dict(str(a).split("=", 1) for a in args)
    assert str(args.get("MINIO_VERSION")) == minio_pin, (
        f"{COMPOSE}: set services.minio.build.args.MINIO_VERSION to {minio_pin} (the Makefile's pin)"
    )
    stage = dockerfile.stage(str(build.get("target")))
    assert stage is not None, f"{DOCKERFILE}: add the stage {build.get('target')!r} that compose builds"
    instructions = dockerfile.global_args + [i for s in dockerfile.stages for i in s.instructions]
    defaults = arg_defaults(instructions, "MINIO_VERSION")
    assert defaults, f"{DOCKERFILE}: declare ARG MINIO_VERSION={minio_pin} in the MinIO build stage"
    assert set(defaults) == {minio_pin}, f"{DOCKERFILE}: set the ARG MINIO_VERSION default to {minio_pin}"
    runs = " ".join(i.args for s in dockerfile.stages for i in s.all("RUN"))
    assert "github.com/minio/minio@${MINIO_VERSION}" in runs, (
        f"{DOCKERFILE}: build with `go install github.com/minio/minio@${{MINIO_VERSION}}`"
    )


def test_webhook_reaches_the_reactor_port(
    services: dict[str, dict[str, Any]], dockerfile: Dockerfile
) -> None:
    minio_env = environment(services["minio"])
    endpoints = {k: v for k, v in minio_env.items() if k.startswith(f"{WEBHOOK_ENV_PREFIX}ENDPOINT_")}
    assert len(endpoints) == 1, (
        f"{COMPOSE}: configure exactly one MINIO_NOTIFY_WEBHOOK_ENDPOINT_<ID> on minio"
    )
    url = urlsplit(next(iter(endpoints.values())))
    assert url.hostname in services, f"{COMPOSE}: the webhook endpoint host must be a service (reactor)"
    assert url.hostname == "reactor", f"{COMPOSE}: point the webhook at http://reactor:<port>{WEBHOOK_PATH}"
    assert url.path == WEBHOOK_PATH, (
        f"{COMPOSE}: the webhook path must be {WEBHOOK_PATH} (reactor/webhook.py)"
    )

    reactor_addr = environment(services["reactor"]).get("REACTOR_HTTP_ADDR")
    assert reactor_addr, f"{COMPOSE}: set REACTOR_HTTP_ADDR=0.0.0.0:<port> on reactor"
    assert reactor_addr.rpartition(":")[0] in {"0.0.0.0", "[::]"}, (  # noqa: S104 - the point of the check
        f"{COMPOSE}: REACTOR_HTTP_ADDR must bind all interfaces in a container, not {reactor_addr}"
    )
    image_addr = dockerfile.final.env().get("REACTOR_HTTP_ADDR")
    assert image_addr, f"{DOCKERFILE}: set ENV REACTOR_HTTP_ADDR=0.0.0.0:<port> in the final stage"
    ports = {
        "the webhook endpoint": url.port,
        "compose REACTOR_HTTP_ADDR": port_of(reactor_addr),
        "Dockerfile REACTOR_HTTP_ADDR": port_of(image_addr),
    }
    assert len(set(ports.values())) == 1, f"use one port everywhere: {ports}"
    assert url.port in exposed_ports(dockerfile.final), f"{DOCKERFILE}: EXPOSE {url.port} in the final stage"


def test_healthchecks(services: dict[str, dict[str, Any]], dockerfile: Dockerfile) -> None:
    for name in ("postgres", "minio", "reactor"):
        health = services[name].get("healthcheck")
        assert health, f"{COMPOSE}: give {name} a healthcheck"
        assert not health.get("disable"), f"{COMPOSE}: do not disable {name}'s healthcheck"
        test = words_of(health.get("test"))
        assert test[:1] in (["CMD"], ["CMD-SHELL"]), f"{COMPOSE}: {name}'s healthcheck test must start CMD"
    assert "pg_isready" in " ".join(words_of(services["postgres"]["healthcheck"]["test"])), (
        f"{COMPOSE}: check postgres with pg_isready"
    )
    port = port_of(environment(services["reactor"])["REACTOR_HTTP_ADDR"])
    reactor_test = " ".join(words_of(services["reactor"]["healthcheck"]["test"]))
    assert f":{port}{HEALTH_PATH}" in reactor_test, (
        f"{COMPOSE}: the reactor healthcheck must GET http://127.0.0.1:{port}{HEALTH_PATH}"
    )
    check = dockerfile.final.last("HEALTHCHECK")
    assert check is not None, f"{DOCKERFILE}: add a HEALTHCHECK to the final (reactor) stage"
    assert check.args.upper() != "NONE", f"{DOCKERFILE}: the final stage's HEALTHCHECK must not be NONE"
    assert f":{port}{HEALTH_PATH}" in check.args, (
        f"{DOCKERFILE}: the HEALTHCHECK must GET http://127.0.0.1:{port}{HEALTH_PATH}"
    )


def test_reactor_runs_replicated(services: dict[str, dict[str, Any]]) -> None:
    reactor = services["reactor"]
    replicas = int((reactor.get("deploy") or {}).get("replicas", 1))
    assert replicas >= 2, f"{COMPOSE}: set services.reactor.deploy.replicas to 2 or more"
    assert "container_name" not in reactor, (
        f"{COMPOSE}: drop container_name from reactor: it prevents replicas"
    )
    fixed = [p for p in reactor.get("ports") or [] if ":" in str(p)]
    assert not fixed, f"{COMPOSE}: reactor ports {fixed} pin a host port, which only one replica can take"


def test_minio_queues_events_durably(services: dict[str, dict[str, Any]]) -> None:
    minio_env = environment(services["minio"])
    queues = [v for k, v in minio_env.items() if k.startswith(f"{WEBHOOK_ENV_PREFIX}QUEUE_DIR_")]
    assert len(queues) == 1, f"{COMPOSE}: set MINIO_NOTIFY_WEBHOOK_QUEUE_DIR_<ID> on minio (else events drop)"
    mounts = volume_targets(services["minio"])
    assert queues[0] in mounts, f"{COMPOSE}: mount a volume at {queues[0]} on minio so queued events survive"
    assert minio_env.get("MINIO_API_SYNC_EVENTS") == "on", f'{COMPOSE}: set MINIO_API_SYNC_EVENTS: "on"'
    enabled = [v for k, v in minio_env.items() if k.startswith(f"{WEBHOOK_ENV_PREFIX}ENABLE_")]
    assert enabled == ["on"], f'{COMPOSE}: set MINIO_NOTIFY_WEBHOOK_ENABLE_<ID>: "on" (quoted)'


def test_minio_and_reactor_share_token_credentials_and_target(services: dict[str, dict[str, Any]]) -> None:
    minio_env = environment(services["minio"])
    reactor_env = environment(services["reactor"])
    tokens = {k: v for k, v in minio_env.items() if k.startswith(f"{WEBHOOK_ENV_PREFIX}AUTH_TOKEN_")}
    assert len(tokens) == 1, f"{COMPOSE}: set MINIO_NOTIFY_WEBHOOK_AUTH_TOKEN_<ID> on minio"
    token_key, token = next(iter(tokens.items()))
    assert token, f"{COMPOSE}: give {token_key} a value (the token MinIO sends)"
    assert token == reactor_env.get("REACTOR_WEBHOOK_TOKEN"), (
        f"{COMPOSE}: {token_key} and the reactor's REACTOR_WEBHOOK_TOKEN must be the same expression, "
        "e.g. ${REACTOR_WEBHOOK_TOKEN:-change-me} in both"
    )
    target_id = token_key.removeprefix(f"{WEBHOOK_ENV_PREFIX}AUTH_TOKEN_")
    for name in ("reactor-init", "reactor"):
        env = environment(services[name])
        assert env.get("REACTOR_NOTIFY_ARN") == f"arn:minio:sqs::{target_id}:webhook", (
            f"{COMPOSE}: set REACTOR_NOTIFY_ARN=arn:minio:sqs::{target_id}:webhook on {name} "
            "(the webhook target MinIO is configured with)"
        )
        assert env.get("REACTOR_MINIO_ACCESS_KEY") == minio_env.get("MINIO_ROOT_USER"), (
            f"{COMPOSE}: {name}'s REACTOR_MINIO_ACCESS_KEY must name a MinIO user (here MINIO_ROOT_USER)"
        )
        assert env.get("REACTOR_MINIO_SECRET_KEY") == minio_env.get("MINIO_ROOT_PASSWORD"), (
            f"{COMPOSE}: {name}'s REACTOR_MINIO_SECRET_KEY must match that user's secret"
        )
        minio_port = words_of(services["minio"].get("command"))
        address = minio_port[minio_port.index("--address") + 1] if "--address" in minio_port else ":9000"
        assert env.get("REACTOR_MINIO_ENDPOINT") == f"minio{address}", (
            f"{COMPOSE}: set {name}'s REACTOR_MINIO_ENDPOINT to minio{address} (MinIO's --address)"
        )


def test_database_url_points_at_the_postgres_service(services: dict[str, dict[str, Any]]) -> None:
    pg_env = environment(services["postgres"])
    for name in ("reactor-init", "reactor"):
        url = urlsplit(environment(services[name]).get("REACTOR_DATABASE_URL", ""))
        assert (url.hostname, url.port) == ("postgres", 5432), (
            f"{COMPOSE}: {name}'s REACTOR_DATABASE_URL must point at postgres:5432"
        )
        assert url.username == pg_env.get("POSTGRES_USER"), f"{COMPOSE}: {name}: use the POSTGRES_USER"
        assert url.password == pg_env.get("POSTGRES_PASSWORD"), (
            f"{COMPOSE}: {name}: the URL's password must be the same expression as POSTGRES_PASSWORD"
        )
        assert url.path == f"/{pg_env.get('POSTGRES_DB')}", f"{COMPOSE}: {name}: use the POSTGRES_DB database"


def test_start_order(services: dict[str, dict[str, Any]]) -> None:
    init = services["reactor-init"]
    for dependency in ("postgres", "minio"):
        condition = (init.get("depends_on") or {}).get(dependency, {}).get("condition")
        assert condition == "service_healthy", (
            f"{COMPOSE}: reactor-init must depend on {dependency} with condition: service_healthy"
        )
    steps = " ".join(words_of(init.get("entrypoint")) + words_of(init.get("command")))
    assert re.search(r"\breactor migrate\b.*&&.*\breactor setup\b", steps), (
        f"{COMPOSE}: reactor-init must run `reactor migrate && reactor setup`"
    )
    assert str(init.get("restart", "no")) == "no", f'{COMPOSE}: reactor-init is one-shot: restart: "no"'
    condition = (services["reactor"].get("depends_on") or {}).get("reactor-init", {}).get("condition")
    assert condition == "service_completed_successfully", (
        f"{COMPOSE}: reactor must depend on reactor-init with condition: service_completed_successfully"
    )


def test_builds_name_this_dockerfile_and_its_stages(
    services: dict[str, dict[str, Any]], dockerfile: Dockerfile
) -> None:
    for name, service in services.items():
        build = service.get("build")
        if build is None:
            continue
        assert isinstance(build, dict), f"{COMPOSE}: give {name} a build mapping with context and target"
        context = (COMPOSE.parent / str(build.get("context", "."))).resolve()
        assert context == ROOT, f"{COMPOSE}: {name}'s build context must be the repository root (..)"
        assert (context / str(build.get("dockerfile", "Dockerfile"))).resolve() == DOCKERFILE, (
            f"{COMPOSE}: {name}'s dockerfile must be docker/Dockerfile (relative to the context)"
        )
        target = build.get("target")
        stage = dockerfile.stage(str(target))
        assert stage is not None, f"{DOCKERFILE}: {name} builds target {target!r}: add that stage"
        user = stage.last("USER")
        assert user is not None, f"{DOCKERFILE}: stage {target} must set a non-root USER"
        assert user.args.split(":")[0] not in ROOT_USERS, f"{DOCKERFILE}: stage {target} must not run as root"
    for name in ("reactor-init", "reactor"):
        target = (services[name].get("build") or {}).get("target")
        assert target == dockerfile.final.name, (
            f"{COMPOSE}: {name} must build the final stage {dockerfile.final.name!r} (the reactor image)"
        )


# --------------------------------------------------------------------------------------------------
# Dockerfile


def test_final_stage_is_the_reactor_running_as_non_root(dockerfile: Dockerfile) -> None:
    final = dockerfile.final
    user = final.last("USER")
    assert user is not None, f"{DOCKERFILE}: add USER 10001:10001 to the final stage"
    assert user.args.split(":")[0] not in ROOT_USERS, f"{DOCKERFILE}: the final stage must not run as root"
    entrypoint = final.last("ENTRYPOINT")
    assert entrypoint is not None, f'{DOCKERFILE}: add ENTRYPOINT ["reactor"] to the final stage'
    assert json.loads(entrypoint.args) == ["reactor"], (
        f'{DOCKERFILE}: the final stage must be the reactor: ENTRYPOINT ["reactor"]'
    )
    command = final.last("CMD")
    assert command is not None, f'{DOCKERFILE}: end the final stage with CMD ["run"]'
    assert json.loads(command.args) == ["run"], f'{DOCKERFILE}: end the final stage with CMD ["run"]'


def test_migrations_and_rules_are_where_the_environment_says(
    services: dict[str, dict[str, Any]], dockerfile: Dockerfile
) -> None:
    destinations: dict[str, str] = {}
    for instruction in dockerfile.final.all("COPY"):
        flags, operands = split_flags(instruction.args)
        if not any(f.startswith("--from") for f in flags):
            for source in operands[:-1]:
                destinations[source.rstrip("/")] = operands[-1].rstrip("/")
    migrations = dockerfile.final.env().get("REACTOR_MIGRATIONS_DIR")
    assert migrations, f"{DOCKERFILE}: set ENV REACTOR_MIGRATIONS_DIR=/app/migrations in the final stage"
    assert destinations.get("migrations") == migrations, (
        f"{DOCKERFILE}: COPY migrations/ to the directory named by ENV REACTOR_MIGRATIONS_DIR"
    )
    assert (ROOT / "migrations" / "env.py").is_file(), "migrations/env.py is gone: fix the Dockerfile COPY"
    rules = environment(services["reactor"]).get("REACTOR_RULES", "")
    examples = destinations.get("examples")
    assert examples, f"{DOCKERFILE}: COPY examples/ into the final stage (compose runs its rules)"
    assert rules.startswith(f"{examples}/"), (
        f"{COMPOSE}: REACTOR_RULES must be a file under {examples} (where the Dockerfile copies examples/)"
    )
    assert (ROOT / "examples" / rules.removeprefix(f"{examples}/")).is_file(), (
        f"{COMPOSE}: REACTOR_RULES={rules} names no file in examples/"
    )


def test_copy_sources_exist_and_are_not_ignored(dockerfile: Dockerfile) -> None:
    ignored = {
        line.strip().rstrip("/")
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    for required in (".git", ".venv", ".bin", ".stack"):
        assert required in ignored, f"{DOCKERIGNORE}: add {required} (it must not reach the build context)"
    for stage in dockerfile.stages:
        for instruction in stage.all("COPY") + stage.all("ADD"):
            flags, operands = split_flags(instruction.args)
            if any(f.startswith("--from") for f in flags):
                continue
            where = f"{DOCKERFILE}:{instruction.line}"
            assert len(operands) >= 2, f"{where}: COPY needs a source and a destination"
            matched = False
            for source in operands[:-1]:
                path = source.rstrip("/")
                if any(ch in path for ch in "*?["):
                    matched = matched or any(ROOT.glob(path))
                    continue
                assert (ROOT / path).exists(), (
                    f"{where}: COPY source {source} does not exist in the repository"
                )
                assert path.split("/")[0] not in ignored, f"{where}: {source} is excluded by {DOCKERIGNORE}"
                matched = True
            assert matched, f"{where}: no COPY source matches a file (Docker fails on that)"


def test_alert_rules_use_metrics_the_reactor_exports() -> None:
    from prometheus_client.parser import text_string_to_metric_families

    from reactor import metrics

    metrics.register_queue(lambda: {"pending": 0, "running": 0, "blocked": 0, "oldest_pending_seconds": 0})
    exported = {
        sample.name
        for family in text_string_to_metric_families(metrics.render().decode())
        for sample in family.samples
    }
    exported |= {f"{m.name}" for m in metrics.registry.collect()}
    rules = yaml.safe_load((ROOT / "docker" / "prometheus" / "alerts.yml").read_text(encoding="utf-8"))
    alerts = [rule for group in rules["groups"] for rule in group["rules"]]
    assert {a["alert"] for a in alerts} >= {
        "ReactorMovesFailed",
        "ReactorKeyBlocked",
        "ReactorOldestPendingTooOld",
        "ReactorWebhook5xx",
    }
    for alert in alerts:
        used = set(re.findall(r"\b(reactor_[a-z_]+)", alert["expr"]))
        assert used, f"alert {alert['alert']} uses no reactor metric"
        unknown = {
            name
            for name in used
            if name not in exported
            and name.removesuffix("_count") not in exported
            and name.removesuffix("_total") not in exported
        }
        assert not unknown, (
            f"alert {alert['alert']} uses {sorted(unknown)}, which reactor/metrics.py does not export"
        )
