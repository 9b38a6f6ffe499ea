"""`reactor run`: wires settings, rules, the outbox, the mover, the poller and the ways in."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from datetime import UTC, datetime

import uvicorn
from apscheduler.schedulers.background import BackgroundScheduler
from prometheus_client import CONTENT_TYPE_LATEST
from sqlalchemy import Engine
from sqlalchemy.engine import make_url
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response

from reactor import logs, metrics
from reactor.domain import OnConflict
from reactor.errors import ConfigError, DatabaseUnavailable, ObjectStoreError
from reactor.ingest import Ingestor
from reactor.listener import BucketListener
from reactor.mover import Mover
from reactor.objectstore import MinioStore
from reactor.outbox import Outbox, make_engine
from reactor.poller import NotifyListener, Poller, PollerConfig
from reactor.reconcile import Reconciler
from reactor.rules import RuleSet, load_rules
from reactor.settings import OnFailure, Settings
from reactor.webhook import create_app

log = logs.get("reactor.runtime")


def libpq_conninfo(database_url: str) -> str:
    """The SQLAlchemy URL as plain libpq conninfo, for the LISTEN connection."""
    return make_url(database_url).set(drivername="postgresql").render_as_string(hide_password=False)


def make_store(settings: Settings, *, pool_size: int, streaming: bool = False) -> MinioStore:
    """streaming: for listen streams, silent between events, so no read timeout (TCP keep-alive)."""
    return MinioStore(
        endpoint=settings.minio_endpoint,
        access_key=settings.minio_access_key,
        secret_key=settings.minio_secret_key.get_secret_value(),
        secure=settings.minio_secure,
        region=settings.minio_region,
        pool_size=pool_size,
        timeout=None if streaming else settings.s3_timeout,
        ca_file=str(settings.minio_ca_file) if settings.minio_ca_file else None,
    )


def check_http_exposure(settings: Settings) -> None:
    if settings.http_is_loopback or settings.webhook_token is not None or settings.allow_unauthenticated:
        return
    raise ConfigError(
        f"REACTOR_HTTP_ADDR={settings.http_addr} is reachable from other hosts but REACTOR_WEBHOOK_TOKEN is "
        "not set: anyone could post events. Set REACTOR_WEBHOOK_TOKEN (and MinIO's "
        "MINIO_NOTIFY_WEBHOOK_AUTH_TOKEN_<ID> to the same value), bind to 127.0.0.1, or set "
        "REACTOR_ALLOW_UNAUTHENTICATED=true if something else guards the port"
    )


def check_schema(engine: Engine) -> None:
    """Refuse to run on an unmigrated database; a database that is down is waited for instead."""
    from sqlalchemy import text
    from sqlalchemy.exc import OperationalError, ProgrammingError

    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1 FROM reactor.moves LIMIT 0"))
    except ProgrammingError as exc:
        raise ConfigError("the database has no reactor schema: run `reactor migrate` first") from exc
    except OperationalError as exc:
        log.warning("database_unreachable_at_start", error=str(exc.orig or exc))


@dataclass
class Service:
    settings: Settings
    rules: RuleSet
    engine: Engine
    outbox: Outbox
    poller: Poller
    ingestor: Ingestor
    scheduler: BackgroundScheduler
    notify: NotifyListener
    listeners: list[BucketListener] = field(default_factory=list)

    def start_background(self) -> None:
        self.notify.start()
        for listener in self.listeners:
            listener.start()
        self.scheduler.start()
        self.poller.wake()

    def stop(self) -> None:
        log.info("reactor_stopping", in_flight=self.poller.busy())
        self._stop()

    def _stop(self) -> None:
        """Stop taking work, let running moves finish while heartbeats keep their leases, then stop."""
        self.poller.stop_claiming()
        for job_id in ("poll", "recover", "reconcile", "prune"):
            if self.scheduler.get_job(job_id) is not None:
                self.scheduler.remove_job(job_id)
        self.notify.stop()
        for listener in self.listeners:
            listener.stop()
        self.poller.stop(timeout=self.settings.lease_seconds)
        self.scheduler.shutdown(wait=False)
        self.engine.dispose()


def build(settings: Settings) -> Service:
    rules = load_rules(settings.require_rules())
    check_http_exposure(settings)
    database_url = settings.database_url.get_secret_value()
    engine = make_engine(database_url, pool_size=settings.concurrency + 4)
    check_schema(engine)
    outbox = Outbox(engine)
    store = make_store(settings, pool_size=settings.concurrency + 2)
    by_name = {rule.name: rule for rule in rules.rules}

    def on_conflict(rule_name: str) -> OnConflict:
        rule = by_name.get(rule_name)
        return rule.on_conflict if rule is not None else OnConflict.OVERWRITE

    poller = Poller(
        outbox=outbox,
        mover=Mover(store),
        config=PollerConfig(
            worker=settings.instance_id,
            concurrency=settings.concurrency,
            lease_seconds=settings.lease_seconds,
            max_attempts=settings.max_attempts,
            block_on_failure=settings.on_failure is OnFailure.BLOCK,
            retry_base_delay=settings.retry_base_delay,
            retry_max_delay=settings.retry_max_delay,
        ),
        on_conflict=on_conflict,
        store_alive=lambda: store.ping(min(rules.source_buckets)),
    )
    ingestor = Ingestor(rules=rules, outbox=outbox, worker=settings.instance_id, on_ready=poller.wake)
    reconciler = Reconciler(
        lister=store, rules=rules, ingestor=ingestor, grace_seconds=settings.reconcile_grace
    )
    scheduler = BackgroundScheduler(
        timezone=UTC, job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": None}
    )
    now = datetime.now(UTC)
    scheduler.add_job(poller.wake, "interval", seconds=settings.poll_interval, id="poll", next_run_time=now)
    scheduler.add_job(poller.heartbeat, "interval", seconds=settings.lease_seconds / 3, id="heartbeat")
    scheduler.add_job(
        poller.recover, "interval", seconds=settings.lease_seconds / 3, id="recover", next_run_time=now
    )
    if settings.reconcile_interval > 0:

        def sweep() -> None:
            try:
                reconciler.sweep()
            except (DatabaseUnavailable, ObjectStoreError) as exc:
                metrics.RECONCILE_RUNS.labels("error").inc()
                log.warning("reconcile_failed", error=str(exc))
            else:
                metrics.RECONCILE_RUNS.labels("ok").inc()

        scheduler.add_job(
            sweep, "interval", seconds=settings.reconcile_interval, id="reconcile", next_run_time=now
        )
    if settings.retention_days is not None:
        retention_days = settings.retention_days

        def prune() -> None:
            try:
                pruned = outbox.prune(older_than_days=retention_days)
            except DatabaseUnavailable as exc:
                log.warning("prune_failed", error=str(exc))
                return
            if pruned:
                metrics.PRUNED.inc(pruned)
                log.info("pruned", moves=pruned, older_than_days=retention_days)

        scheduler.add_job(prune, "interval", hours=1, id="prune", next_run_time=now)
    metrics.register_queue(outbox.queue_gauges)
    notify = NotifyListener(libpq_conninfo(database_url), poller.wake)
    listeners: list[BucketListener] = []
    if settings.listen:
        listen_client = make_store(settings, pool_size=len(rules.source_buckets) + 1, streaming=True).client
        listeners = [
            BucketListener(client=listen_client, bucket=bucket, ingestor=ingestor)
            for bucket in sorted(rules.source_buckets)
        ]
    return Service(
        settings=settings,
        rules=rules,
        engine=engine,
        outbox=outbox,
        poller=poller,
        ingestor=ingestor,
        scheduler=scheduler,
        notify=notify,
        listeners=listeners,
    )


async def _metrics_endpoint(_request: Request) -> Response:
    body = await run_in_threadpool(metrics.render)
    return Response(body, media_type=CONTENT_TYPE_LATEST)


# How long a thread may hold the GIL while another waits (CPython's default: 5 ms). The reactor's
# threads are I/O-bound (S3 calls, PostgreSQL, webhook requests) and each move waits on several
# round trips in a row: with the default, a thread whose answer arrived can wait up to 5 ms per
# round trip for a busy neighbour, which is most of a move's latency on loopback.
GIL_SWITCH_INTERVAL = 0.0005


def run(settings: Settings) -> None:
    sys.setswitchinterval(GIL_SWITCH_INTERVAL)
    service = build(settings)
    token = settings.webhook_token.get_secret_value() if settings.webhook_token is not None else None

    def ping() -> None:
        service.outbox.ping()

    # Start and stop inside uvicorn's lifespan: on SIGTERM uvicorn re-raises the signal after
    # serve() returns, so code after server.run() would never drain the running moves.
    app = create_app(
        ingestor=service.ingestor,
        ping=ping,
        token=token,
        max_body=settings.webhook_max_body,
        body_timeout=settings.webhook_body_timeout,
        on_start=service.start_background,
        on_stop=service.stop,
    )
    app.add_route("/metrics", _metrics_endpoint, methods=["GET"])
    app.add_middleware(metrics.WebhookMetrics)
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host=settings.http_host,
            port=settings.http_port,
            log_config=None,
            access_log=False,
            timeout_keep_alive=30,
            timeout_graceful_shutdown=10,
        )
    )
    log.info(
        "reactor_starting",
        worker=settings.instance_id,
        http=settings.http_addr,
        rules=[rule.name for rule in service.rules.rules],
        listen=settings.listen,
        concurrency=settings.concurrency,
        lease_seconds=settings.lease_seconds,
    )
    server.run()
