"""The `reactor` command: migrate, setup, run, status, history, retry."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Sequence
from functools import wraps
from typing import Any, ParamSpec, TypeVar

import click
from sqlalchemy import text

from reactor import logs
from reactor.domain import MoveStatus
from reactor.errors import ConfigError, ReactorError
from reactor.report import parse_since, table, to_csv, to_json_lines
from reactor.settings import Settings, load_settings

P = ParamSpec("P")
R = TypeVar("R")


def _friendly(func: Callable[P, R]) -> Callable[P, R]:
    """Our own errors become one clear line on stderr and a non-zero exit, never a traceback."""

    @wraps(func)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return func(*args, **kwargs)
        except ConfigError as exc:
            click.echo(f"reactor: configuration error: {exc}", err=True)
            sys.exit(2)
        except ReactorError as exc:
            click.echo(f"reactor: error: {exc}", err=True)
            sys.exit(1)

    return wrapper


def _settings() -> Settings:
    settings = load_settings()
    logs.configure(level=settings.log_level, fmt=settings.log_format)
    return settings


def _engine(settings: Settings) -> Any:
    from reactor.outbox import make_engine

    return make_engine(settings.database_url.get_secret_value(), pool_size=2)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="reactor")
def main() -> None:
    """Turn MinIO uploads into ordered, verified, audited moves (configured by REACTOR_* variables)."""


@main.command()
@_friendly
def migrate() -> None:
    """Create or upgrade the database schema (safe to run from several instances at once)."""
    from sqlalchemy.exc import DBAPIError, OperationalError

    from reactor.migrate import upgrade

    settings = _settings()
    try:
        upgrade(settings.database_url.get_secret_value())
    except OperationalError as exc:
        raise ReactorError(
            f"cannot reach PostgreSQL to migrate: {exc.orig or exc}; check REACTOR_DATABASE_URL"
        ) from None
    except DBAPIError as exc:
        raise ReactorError(
            f"migration failed: {exc.orig or exc}; `reactor migrate` needs the role that owns the reactor "
            "schema (see docs/security.md), not the service role"
        ) from None
    click.echo("database schema is up to date")


@main.command()
@_friendly
def setup() -> None:
    """Create every bucket the rules name; subscribe sources to REACTOR_NOTIFY_ARN when set."""
    from reactor.provision import setup as provision
    from reactor.rules import load_rules
    from reactor.runtime import make_store

    settings = _settings()
    rules = load_rules(settings.require_rules())
    changes = provision(make_store(settings, pool_size=2).client, rules, settings.notify_arn)
    for line in changes or ["nothing to change"]:
        click.echo(line)


@main.command()
@_friendly
def run() -> None:
    """Run the service in the foreground: webhook endpoint, listeners (if enabled) and pollers."""
    from reactor.runtime import run as run_service

    run_service(_settings())


@main.command()
@_friendly
def reconcile() -> None:
    """One sweep now: enqueue every matching upload older than REACTOR_RECONCILE_GRACE that has no move."""
    from reactor.ingest import Ingestor
    from reactor.outbox import Outbox
    from reactor.reconcile import Reconciler
    from reactor.rules import load_rules
    from reactor.runtime import make_store

    settings = _settings()
    rules = load_rules(settings.require_rules())
    engine = _engine(settings)
    try:
        report = Reconciler(
            lister=make_store(settings, pool_size=2),
            rules=rules,
            ingestor=Ingestor(rules=rules, outbox=Outbox(engine), worker=settings.instance_id),
            grace_seconds=settings.reconcile_grace,
        ).sweep()
    finally:
        engine.dispose()
    click.echo(
        f"listed {report.listed}, enqueued {report.enqueued}, already known {report.already_known}, "
        f"too recent {report.too_recent}, unmatched {report.unmatched}"
    )


def _output_options(func: Callable[P, R]) -> Callable[P, R]:
    func = click.option("--csv", "as_csv", is_flag=True, help="Print CSV with a header row.")(func)
    func = click.option(
        "--json", "as_json", is_flag=True, help="Print JSON (one object per line for lists)."
    )(func)
    func = click.option("--rule", help="Only moves of this rule.")(func)
    return click.option("--since", help="Only moves enqueued since: 30m, 2h, 7d, 1w, or an ISO time.")(func)


def _filters(since: str | None, rule: str | None) -> tuple[list[str], dict[str, Any]]:
    where: list[str] = []
    params: dict[str, Any] = {}
    if since is not None:
        where.append("enqueued_at >= :since")
        params["since"] = parse_since(since)
    if rule is not None:
        where.append("rule = :rule")
        params["rule"] = rule
    return where, params


def _where(clauses: Sequence[str]) -> str:
    return (" WHERE " + " AND ".join(clauses)) if clauses else ""


def _emit(text_out: str) -> None:
    if text_out:
        click.echo(text_out)


@main.command()
@_output_options
@_friendly
def status(since: str | None, rule: str | None, as_json: bool, as_csv: bool) -> None:
    """Counts per status, the oldest pending move's age, and the keys that are blocked."""
    settings = _settings()
    where, params = _filters(since, rule)
    engine = _engine(settings)
    with engine.connect() as conn:
        counts = {
            row.status: int(row.n)
            for row in conn.execute(
                text(
                    f"SELECT status, count(*) AS n FROM reactor.move_history{_where(where)} GROUP BY status"
                ),
                params,
            )
        }
        oldest = conn.execute(
            text(
                "SELECT extract(epoch FROM now() - min(enqueued_at)) FROM reactor.move_history"
                + _where([*where, "status = 'pending'"])
            ),
            params,
        ).scalar_one()
        retrying = conn.execute(
            text(
                "SELECT count(*) FROM reactor.move_history"
                + _where([*where, "status = 'pending'", "attempts > 0"])
            ),
            params,
        ).scalar_one()
        blocked = [
            dict(row._mapping)
            for row in conn.execute(
                text(
                    "SELECT order_key, move_id, seq, rule, last_error FROM reactor.move_history"
                    + _where([*where, "blocking"])
                    + " ORDER BY order_key"
                ),
                params,
            )
        ]
    engine.dispose()
    per_status = {s.value: counts.get(s.value, 0) for s in MoveStatus}
    oldest_seconds = None if oldest is None else round(float(oldest), 3)
    if as_json:
        report = {
            "counts": per_status,
            "retrying": int(retrying),
            "oldest_pending_seconds": oldest_seconds,
            "blocked_keys": blocked,
        }
        click.echo(json.dumps(report, indent=2, default=str, ensure_ascii=False))
        return
    rows = [{"status": name, "moves": n} for name, n in per_status.items()]
    rows.append({"status": "retrying", "moves": int(retrying)})
    if as_csv:
        _emit(to_csv(rows, ("status", "moves")))
        return
    click.echo(table(rows, ("status", "moves")))
    click.echo(f"oldest pending: {_age(oldest_seconds)}")
    if blocked:
        click.echo(f"blocked keys ({len(blocked)}): run `reactor retry MOVE_ID` once the cause is fixed")
        click.echo(table(blocked, ("order_key", "move_id", "seq", "last_error")))
    else:
        click.echo("blocked keys: none")


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.1f}s"
    if seconds < 7200:
        return f"{seconds / 60:.1f}m"
    return f"{seconds / 3600:.1f}h"


HISTORY_COLUMNS = (
    "move_id", "order_key", "seq", "rule", "source_bucket", "source_key", "source_version_id", "etag", "size",
    "target_bucket", "target_key", "status", "attempts", "last_error", "enqueued_at", "started_at",
    "finished_at", "worker", "note", "via",
)  # fmt: skip
HISTORY_TABLE = ("move_id", "order_key", "seq", "status", "attempts", "source_key", "finished_at")


@main.command()
@click.option("--order-key", help="Only moves of this order key (shown in seq order).")
@click.option("--source-key", help="Only moves of this source key.")
@click.option(
    "--status", "status_", type=click.Choice([s.value for s in MoveStatus]), help="Only this status."
)
@click.option("--limit", type=click.IntRange(1, 1_000_000), default=50, show_default=True)
@_output_options
@_friendly
def history(  # noqa: PLR0917 - click passes every option
    order_key: str | None,
    source_key: str | None,
    status_: str | None,
    limit: int,
    since: str | None,
    rule: str | None,
    as_json: bool,
    as_csv: bool,
) -> None:
    """List moves from reactor.move_history, newest first (or in seq order for one key)."""
    settings = _settings()
    where, params = _filters(since, rule)
    params["limit"] = limit
    for column, value in (("order_key", order_key), ("source_key", source_key), ("status", status_)):
        if value is not None:
            where.append(f"{column} = :{column}")
            params[column] = value
    order = "seq" if order_key is not None else "move_id DESC"
    columns = ", ".join(HISTORY_COLUMNS)
    sql = f"SELECT {columns} FROM reactor.move_history{_where(where)} ORDER BY {order} LIMIT :limit"
    engine = _engine(settings)
    with engine.connect() as conn:
        rows = [dict(r._mapping) for r in conn.execute(text(sql), params)]
    engine.dispose()
    if as_json:
        _emit(to_json_lines(rows))
    elif as_csv:
        _emit(to_csv(rows, HISTORY_COLUMNS))
    else:
        click.echo(table(rows, HISTORY_TABLE))


@main.command()
@click.option(
    "--older-than",
    "days",
    type=click.FloatRange(min=0, min_open=True),
    required=True,
    help="Remove finished moves (and their events) that finished more than DAYS days ago.",
)
@click.option("--batch", type=click.IntRange(1, 100_000), default=1000, show_default=True)
@_friendly
def prune(days: float, batch: int) -> None:
    """Delete finished history in small batches; moves still pending, running or blocking stay."""
    from reactor.outbox import Outbox

    settings = _settings()
    engine = _engine(settings)
    try:
        pruned = Outbox(engine).prune(older_than_days=days, batch=batch)
    finally:
        engine.dispose()
    if pruned is None:
        raise ReactorError("another instance is pruning right now; try again when it has finished")
    click.echo(f"pruned {pruned} finished move(s) older than {days:g} day(s)")


@main.command()
@click.argument("move_ids", nargs=-1, type=int)
@click.option("--failed", "all_failed", is_flag=True, help="Retry every failed move.")
@_friendly
def retry(move_ids: tuple[int, ...], all_failed: bool) -> None:
    """Put failed moves back in the queue (and unblock their keys)."""
    from reactor.outbox import Outbox

    if not move_ids and not all_failed:
        raise ConfigError("name the moves to retry (reactor retry MOVE_ID...) or pass --failed")
    settings = _settings()
    engine = _engine(settings)
    outbox = Outbox(engine)
    wanted = list(move_ids) + (outbox.failed_move_ids() if all_failed else [])
    retried = outbox.retry(wanted, worker=settings.instance_id)
    engine.dispose()
    skipped = sorted(set(wanted) - set(retried))
    click.echo(f"retried {len(retried)} move(s): {' '.join(map(str, retried)) or '-'}")
    if skipped:
        click.echo(f"not failed or not found, left alone: {' '.join(map(str, skipped))}", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
