"""Prometheus metrics: counters and histograms updated where things happen, queue gauges from one
cached query (never one query per scrape per key)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

disable_created_metrics()  # type: ignore[no-untyped-call]  # *_created series double the output and no alert or dashboard uses them
registry = CollectorRegistry(auto_describe=True)

MOVES_FINISHED = Counter(
    "reactor_moves_finished_total",
    "Moves that reached a final status (done, superseded, failed), by rule.",
    ["rule", "status"],
    registry=registry,
)
MOVE_RETRIES = Counter(
    "reactor_move_retries_total",
    "Failed attempts that were scheduled to retry, by rule.",
    ["rule"],
    registry=registry,
)
MOVE_DURATION = Histogram(
    "reactor_move_duration_seconds",
    "Time one attempt of a move took, from claim to recorded outcome.",
    ["rule", "status"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
    registry=registry,
)
EVENTS = Counter(
    "reactor_events_received_total",
    "Upload notices received, by way in and what became of them (enqueued, duplicate, ignored, rejected).",
    ["way", "result"],
    registry=registry,
)
WEBHOOK_DURATION = Histogram(
    "reactor_webhook_request_duration_seconds",
    "Time to answer a webhook POST, by HTTP status.",
    ["status"],
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 5),
    registry=registry,
)
RECONCILE_FOUND = Counter(
    "reactor_reconcile_found_total",
    "Uploads the reconcile sweep found without a move and enqueued.",
    registry=registry,
)
RECONCILE_RUNS = Counter(
    "reactor_reconcile_runs_total", "Reconcile sweeps, by result (ok, error).", ["result"], registry=registry
)
ERRORS = Counter(
    "reactor_errors_total",
    "Errors talking to a dependency (minio, postgres), by what was being done.",
    ["dependency", "operation"],
    registry=registry,
)
PRUNED = Counter("reactor_pruned_moves_total", "Finished moves removed by retention.", registry=registry)


class QueueCollector(Collector):
    """Pending/running/blocked counts and the oldest pending age, from one query cached for `ttl`
    seconds, so many scrapers (or many replicas' scrapes) cost the database almost nothing."""

    def __init__(self, fetch: Callable[[], dict[str, float]], ttl: float = 5.0) -> None:
        self.fetch = fetch
        self.ttl = ttl
        self._lock = threading.Lock()
        self._at = 0.0
        self._values: dict[str, float] | None = None

    def _current(self) -> dict[str, float] | None:
        with self._lock:
            if self._values is None or time.monotonic() - self._at > self.ttl:
                try:
                    self._values = self.fetch()
                except Exception:  # a scrape never fails because the database is down
                    ERRORS.labels("postgres", "queue_gauges").inc()
                    self._values = None
                self._at = time.monotonic()
            return self._values

    def collect(self) -> Iterator[GaugeMetricFamily]:
        values = self._current()
        up = GaugeMetricFamily("reactor_database_up", "1 when the last queue query succeeded.")
        up.add_metric([], 0.0 if values is None else 1.0)
        yield up
        if values is None:
            return
        for name, key, doc in (
            ("reactor_moves_pending", "pending", "Moves waiting to run (including retries in backoff)."),
            ("reactor_moves_running", "running", "Moves running now, across all instances."),
            (
                "reactor_keys_blocked",
                "blocked",
                "Order keys stopped by a failed move (REACTOR_ON_FAILURE=block).",
            ),
            ("reactor_oldest_pending_seconds", "oldest_pending_seconds", "Age of the oldest pending move."),
        ):
            gauge = GaugeMetricFamily(name, doc)
            gauge.add_metric([], values[key])
            yield gauge


_queue: QueueCollector | None = None


def register_queue(fetch: Callable[[], dict[str, float]]) -> None:
    """Report queue gauges from `fetch`; registering again replaces the previous source."""
    global _queue  # noqa: PLW0603 - one queue collector per process registry
    if _queue is not None:
        registry.unregister(_queue)
    _queue = QueueCollector(fetch)
    registry.register(_queue)


def render() -> bytes:
    return generate_latest(registry)


class WebhookMetrics:
    """ASGI middleware: times webhook POSTs by status and counts refused bodies as rejected events."""

    def __init__(self, app: ASGIApp, path: str = "/minio/events") -> None:
        self.app = app
        self.path = path

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path") != self.path:
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def record_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, record_status)
        finally:
            WEBHOOK_DURATION.labels(str(status)).observe(time.perf_counter() - started)
            if 400 <= status < 500:
                EVENTS.labels("webhook", "rejected").inc()
            elif status == 503:
                ERRORS.labels("postgres", "webhook").inc()
