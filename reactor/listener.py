"""The zero-config way in: MinIO's ListenBucketNotification stream, one thread per source bucket.

The stream is in memory only: events published while no one listens are gone, and every
listening instance gets every event (the outbox's dedup makes that one move). Gaps are logged
with their length, so an operator (or the reconcile sweep) knows when to look.

Reading and recording are two threads per bucket: the reader parses the stream as fast as MinIO
sends it, and the ingester records whatever has arrived meanwhile in one round trip (a burst of
uploads becomes a few batched enqueues instead of one transaction per event).
"""

from __future__ import annotations

import queue
import threading
import time
from typing import Any

from minio import Minio

from reactor import logs, metrics
from reactor.domain import Ignored, Upload
from reactor.errors import DatabaseUnavailable, EventError
from reactor.events import UPLOAD_EVENTS, parse_listen_event
from reactor.ingest import Ingestor
from reactor.objectstore import listen

log = logs.get("reactor.listener")

BATCH = 500  # notices per enqueue round trip
BACKLOG = 20_000  # notices read but not yet recorded; the reader waits when it is full


class BucketListener(threading.Thread):
    def __init__(
        self, *, client: Minio, bucket: str, ingestor: Ingestor, db_retry_seconds: float = 30.0
    ) -> None:
        super().__init__(name=f"listen-{bucket}", daemon=True)
        self.client = client
        self.bucket = bucket
        self.ingestor = ingestor
        self.db_retry_seconds = db_retry_seconds
        self._stop = threading.Event()
        self._backlog: queue.Queue[Upload | Ignored] = queue.Queue(maxsize=BACKLOG)
        self._ingester = threading.Thread(target=self._ingest_loop, name=f"ingest-{bucket}", daemon=True)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop reading; what was read is still recorded (bounded by `timeout`)."""
        self._stop.set()
        if self._ingester.is_alive() and self._ingester is not threading.current_thread():
            self._ingester.join(timeout)

    def run(self) -> None:
        self._ingester.start()
        delay = 0.5
        disconnected_at: float | None = None
        while not self._stop.is_set():
            try:
                # MinIO sends no response headers before the first event, so the client cannot
                # see the moment the subscription starts: log the attempt, not a confirmation.
                if disconnected_at is not None:
                    log.warning(
                        "listen_reconnected",
                        bucket=self.bucket,
                        gap_seconds=round(time.monotonic() - disconnected_at, 3),
                    )
                else:
                    log.info("listen_connecting", bucket=self.bucket)
                disconnected_at = None
                with listen(self.client, self.bucket, sorted(UPLOAD_EVENTS)) as stream:
                    delay = 0.5
                    for event in stream:
                        if self._stop.is_set():
                            return
                        self._handle(event)
            except Exception as exc:  # network errors, MinIO restarts: reconnect with backoff
                metrics.ERRORS.labels("minio", "listen").inc()
                if disconnected_at is None:
                    disconnected_at = time.monotonic()
                log.warning("listen_disconnected", bucket=self.bucket, error=str(exc), retry_in=delay)
                self._stop.wait(delay)
                delay = min(delay * 2, 10.0)

    def _handle(self, event: dict[str, Any]) -> None:
        try:
            notices = parse_listen_event(event)
        except EventError as exc:
            log.error("listen_event_invalid", bucket=self.bucket, error=str(exc))
            return
        for notice in notices:
            while True:
                if self._stop.is_set():
                    log.error("listen_event_lost", bucket=self.bucket, key=notice.key, error="stopping")
                    break
                try:
                    self._backlog.put(notice, timeout=0.5)
                    break
                except queue.Full:
                    continue

    def _ingest_loop(self) -> None:
        """Record what the reader parsed, in batches; at stop, what is already read is still
        recorded (one attempt) before the thread ends."""
        while True:
            try:
                first = self._backlog.get(timeout=0.5)
            except queue.Empty:
                if self._stop.is_set():
                    return
                continue
            batch = [first]
            while len(batch) < BATCH:
                try:
                    batch.append(self._backlog.get_nowait())
                except queue.Empty:
                    break
            self._ingest(batch)

    def _ingest(self, notices: list[Upload | Ignored]) -> None:
        deadline = time.monotonic() + self.db_retry_seconds
        delay = 0.2
        while True:
            try:
                self.ingestor.ingest(notices, via="listen")
                return
            except DatabaseUnavailable as exc:
                metrics.ERRORS.labels("postgres", "listen").inc()
                if time.monotonic() > deadline or self._stop.is_set():
                    log.error(
                        "listen_event_lost",
                        bucket=self.bucket,
                        keys=[n.key for n in notices],
                        error=str(exc),
                    )
                    return
                time.sleep(delay)
                delay = min(delay * 2, 2.0)
            except Exception:  # not an outage: record them one by one, so one bad notice loses only itself
                if len(notices) == 1:
                    log.exception("listen_event_lost", bucket=self.bucket, key=notices[0].key)
                    return
                for notice in notices:
                    self._ingest([notice])
                return
