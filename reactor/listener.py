"""The zero-config way in: MinIO's ListenBucketNotification stream, one thread per source bucket.

The stream is in memory only: events published while no one listens are gone, and every
listening instance gets every event (the outbox's dedup makes that one move). Gaps are logged
with their length, so an operator (or the reconcile sweep) knows when to look.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from minio import Minio

from reactor import logs, metrics
from reactor.errors import DatabaseUnavailable, EventError
from reactor.events import UPLOAD_EVENTS, parse_listen_event
from reactor.ingest import Ingestor

log = logs.get("reactor.listener")


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

    def stop(self) -> None:
        self._stop.set()

    def run(self) -> None:
        delay = 0.5
        disconnected_at: float | None = None
        while not self._stop.is_set():
            try:
                stream = self.client.listen_bucket_notification(
                    self.bucket, events=tuple(sorted(UPLOAD_EVENTS))
                )
                with stream:
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
                        keys=[getattr(n, "key", "") for n in notices],
                        error=str(exc),
                    )
                    return
                self._stop.wait(delay)
                delay = min(delay * 2, 2.0)
