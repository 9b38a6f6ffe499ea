"""From notices to outbox rows: the one path every way in (webhook, listen) takes."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from reactor import logs, metrics
from reactor.domain import Ignored, Upload, Via
from reactor.outbox import NewMove, Outbox
from reactor.rules import RuleSet

log = logs.get("reactor.ingest")


@dataclass
class IngestReport:
    enqueued: int = 0
    duplicate: int = 0
    ignored: int = 0
    failed_at_enqueue: int = 0
    reasons: Counter[str] = field(default_factory=Counter)


class Ingestor:
    """Matches each upload against the rules and records a move for it, once."""

    def __init__(
        self, *, rules: RuleSet, outbox: Outbox, worker: str, on_ready: Callable[[], None] | None = None
    ) -> None:
        self.rules = rules
        self.outbox = outbox
        self.worker = worker
        # Called when an enqueue made a move runnable at once: this instance's poller claims it
        # without waiting for its own NOTIFY to come back from PostgreSQL (other instances still
        # get the NOTIFY).
        self.on_ready = on_ready

    def ingest(self, notices: Iterable[Upload | Ignored], *, via: Via) -> IngestReport:
        """Every matched upload is committed, in one round trip and one transaction, before this
        returns; DatabaseUnavailable propagates (and then none of them is)."""
        report = IngestReport()
        pending: list[tuple[NewMove, dict[str, str]]] = []
        for notice in notices:
            if isinstance(notice, Ignored):
                metrics.EVENTS.labels(via, "ignored").inc()
                report.ignored += 1
                report.reasons[notice.reason] += 1
                log.debug(
                    "notice_ignored", via=via, bucket=notice.bucket, key=notice.key, reason=notice.reason
                )
                continue
            match = self.rules.match(notice.bucket, notice.key)
            if match is None:
                metrics.EVENTS.labels(via, "ignored").inc()
                report.ignored += 1
                report.reasons["no rule matches"] += 1
                log.debug("upload_unmatched", via=via, bucket=notice.bucket, key=notice.key)
                continue
            move = NewMove(
                upload=notice,
                rule=match.rule.name,
                order_key=match.order_key,
                target_bucket=match.target_bucket,
                target_key=match.target_key,
                via=via,
                error=match.target_error,
            )
            fields = {
                "via": via,
                "order_key": match.order_key,
                "source": f"{notice.bucket}/{notice.key}",
                "target": f"{match.target_bucket}/{match.target_key}",
                "etag": notice.etag,
            }
            pending.append((move, fields))
        results = self.outbox.enqueue_many([move for move, _ in pending], worker=self.worker)
        if self.on_ready is not None and any(r.is_head for r in results):
            self.on_ready()
        for (move, fields), result in zip(pending, results, strict=True):
            if result.duplicate:
                metrics.EVENTS.labels(via, "duplicate").inc()
                report.duplicate += 1
                log.debug("upload_duplicate", **fields)
            elif move.error is not None:
                metrics.EVENTS.labels(via, "rejected").inc()
                report.failed_at_enqueue += 1
                log.error("move_rejected", move_id=result.move_id, seq=result.seq, error=move.error, **fields)
            else:
                metrics.EVENTS.labels(via, "enqueued").inc()
                report.enqueued += 1
                log.info("move_enqueued", move_id=result.move_id, seq=result.seq, **fields)
        return report
