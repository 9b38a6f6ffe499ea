"""The reconcile sweep: finds uploads whose notification never arrived and enqueues them.

Listen streams lose what is published while nobody listens, and a webhook without a queue drops
what it cannot deliver. The sweep lists each rule's source prefix page by page and hands every
upload older than a grace period to the same ingestion path as events, so the outbox's dedup
(bucket, key, version, ETag, time to the millisecond) makes it one move whichever way arrives
first, and several instances may sweep at once.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Protocol

from reactor import logs, metrics
from reactor.domain import Upload
from reactor.ingest import Ingestor
from reactor.objectstore import Listed
from reactor.rules import RuleSet

log = logs.get("reactor.reconcile")

# Uploads enqueued per round trip (a listing page holds up to 1,000 objects).
SWEEP_BATCH = 500


class Lister(Protocol):
    def list_uploads(self, bucket: str, prefix: str, *, versioned: bool) -> Iterator[Listed]: ...

    def versioned(self, bucket: str) -> bool: ...


@dataclass
class SweepReport:
    listed: int = 0
    too_recent: int = 0
    enqueued: int = 0
    already_known: int = 0
    unmatched: int = 0


def as_upload(bucket: str, item: Listed) -> Upload:
    """A listed object as the upload an event would have named; its time is known to the ms."""
    modified = item.last_modified or datetime.fromtimestamp(0, UTC)
    ms = int(modified.timestamp() * 1000)
    return Upload(
        bucket=bucket,
        key=item.key,
        etag=item.etag,
        size=item.size,
        version_id=item.version_id,
        sequencer=f"{ms * 1_000_000:016X}",
        event_name="reactor:Reconcile",
        event_time=modified.isoformat(),
    )


class Reconciler:
    def __init__(self, *, lister: Lister, rules: RuleSet, ingestor: Ingestor, grace_seconds: float) -> None:
        self.lister = lister
        self.rules = rules
        self.ingestor = ingestor
        self.grace = timedelta(seconds=grace_seconds)

    def _ingest(self, batch: list[Upload], report: SweepReport) -> None:
        """One round trip per batch: a sweep over a large, mostly known prefix stays cheap."""
        if not batch:
            return
        result = self.ingestor.ingest(batch, via="sweep")
        report.enqueued += result.enqueued + result.failed_at_enqueue
        report.already_known += result.duplicate
        report.unmatched += result.ignored

    def sweep(self) -> SweepReport:
        """One pass over every rule's source prefix; uploads newer than the grace are left to events."""
        report = SweepReport()
        cutoff = datetime.now(UTC) - self.grace
        for bucket in sorted(self.rules.source_buckets):
            versioned = self.lister.versioned(bucket)
            for prefix in self.rules.prefixes(bucket):
                batch: list[Upload] = []
                for item in self.lister.list_uploads(bucket, prefix, versioned=versioned):
                    report.listed += 1
                    if item.last_modified is not None and item.last_modified > cutoff:
                        report.too_recent += 1
                        continue
                    batch.append(as_upload(bucket, item))
                    if len(batch) >= SWEEP_BATCH:
                        self._ingest(batch, report)
                        batch = []
                self._ingest(batch, report)
        metrics.RECONCILE_FOUND.inc(report.enqueued)
        if report.enqueued:
            log.warning("reconcile_found_missed_uploads", **report.__dict__)
        else:
            log.info("reconcile_done", **report.__dict__)
        return report
