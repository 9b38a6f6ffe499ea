"""The `reactor` command: migrate, setup, run, status, history, retry."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from functools import wraps
from typing import Any, ParamSpec, TypeVar

import click
from sqlalchemy import text

from reactor import logs
from reactor.domain import MoveStatus
from reactor.errors import ConfigError, ReactorError
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
    from sqlalchemy.exc import OperationalError

    from reactor.migrate import upgrade

    settings = _settings()
    try:
        upgrade(settings.database_url.get_secret_value())
    except OperationalError as exc:
        raise ReactorError(
            f"cannot reach PostgreSQL to migrate: {exc.orig or exc}; check REACTOR_DATABASE_URL"
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


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = float(seconds)
    if seconds < 120:
        return f"{seconds:.1f}s"
    if seconds < 7200:
        return f"{seconds / 60:.1f}m"
    return f"{seconds / 3600:.1f}h"


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
@_friendly
def status(as_json: bool) -> None:
    """Counts per status, the oldest pending move's age, and the keys that are blocked."""
    settings = _settings()
    engine = _engine(settings)
    with engine.connect() as conn:
        counts = {
            row.status: row.n
            for row in conn.execute(
                text("SELECT status::text AS status, count(*) AS n FROM reactor.moves GROUP BY status")
            )
        }
        oldest = conn.execute(
            text(
                "SELECT extract(epoch FROM now() - min(enqueued_at)) "
                "FROM reactor.moves WHERE status = 'pending'"
            )
        ).scalar_one()
        blocked = [
            dict(row._mapping)
            for row in conn.execute(
                text(
                    "SELECT order_key, id AS move_id, seq, last_error FROM reactor.moves "
                    "WHERE blocking ORDER BY order_key"
                )
            )
        ]
        retrying = conn.execute(
            text("SELECT count(*) FROM reactor.moves WHERE status = 'pending' AND attempts > 0")
        ).scalar_one()
    engine.dispose()
    per_status = {s.value: int(counts.get(s.value, 0)) for s in MoveStatus}
    report: dict[str, Any] = {
        "counts": per_status,
        "retrying": int(retrying),
        "oldest_pending_seconds": None if oldest is None else round(float(oldest), 3),
        "blocked_keys": blocked,
    }
    if as_json:
        click.echo(json.dumps(report, indent=2, default=str))
        return
    for name, n in per_status.items():
        click.echo(f"{name:<11}{n:>9}")
    click.echo(f"{'retrying':<11}{report['retrying']:>9}   (pending after a failed attempt)")
    click.echo(f"oldest pending: {_age(oldest)}")
    if blocked:
        click.echo(f"blocked keys ({len(blocked)}): run `reactor retry MOVE_ID` once the cause is fixed")
        for item in blocked:
            click.echo(
                f"  {item['order_key']}  move {item['move_id']} (seq {item['seq']}): {item['last_error']}"
            )
    else:
        click.echo("blocked keys: none")


HISTORY_COLUMNS = (
    "move_id", "order_key", "seq", "rule", "source_bucket", "source_key", "source_version_id", "etag", "size",
    "target_bucket", "target_key", "status", "attempts", "last_error", "enqueued_at", "started_at",
    "finished_at", "worker", "note",
)  # fmt: skip


@main.command()
@click.option("--order-key", help="Only moves of this order key (shown in seq order).")
@click.option("--source-key", help="Only moves of this source key.")
@click.option(
    "--status", "status_", type=click.Choice([s.value for s in MoveStatus]), help="Only this status."
)
@click.option("--limit", type=click.IntRange(1, 100_000), default=50, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON lines, one move per line.")
@_friendly
def history(
    order_key: str | None, source_key: str | None, status_: str | None, limit: int, as_json: bool
) -> None:
    """List moves from reactor.move_history, newest first (or in seq order for one key)."""
    settings = _settings()
    where: list[str] = []
    params: dict[str, Any] = {"limit": limit}
    if order_key is not None:
        where.append("order_key = :order_key")
        params["order_key"] = order_key
    if source_key is not None:
        where.append("source_key = :source_key")
        params["source_key"] = source_key
    if status_ is not None:
        where.append("status = :status")
        params["status"] = status_
    order = "seq" if order_key is not None else "move_id DESC"
    sql = (
        f"SELECT {', '.join(HISTORY_COLUMNS)} FROM reactor.move_history"
        f"{' WHERE ' + ' AND '.join(where) if where else ''} ORDER BY {order} LIMIT :limit"
    )
    engine = _engine(settings)
    with engine.connect() as conn:
        rows = [dict(r._mapping) for r in conn.execute(text(sql), params)]
    engine.dispose()
    if as_json:
        for row in rows:
            click.echo(json.dumps(row, default=str, ensure_ascii=False))
        return
    _table(
        rows, ("move_id", "order_key", "seq", "status", "attempts", "source_key", "target_key", "finished_at")
    )


def _table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> None:
    def cell(value: Any) -> str:
        if isinstance(value, datetime):
            return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")
        return "-" if value is None else str(value)

    cells = [[cell(row[c]) for c in columns] for row in rows]
    widths = [max([len(c), *(len(r[i]) for r in cells)]) for i, c in enumerate(columns)]
    click.echo("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)))
    for r in cells:
        click.echo("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)))
    if not rows:
        click.echo("(no moves)")


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
