"""Auditing: the raw event in move_history, per-key summary and timeline views, a read-only
auditor role, and an index that lets retention prune finished moves in batches.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-04
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

UPGRADE = """
-- Retention deletes finished moves oldest first; only finished ones are in this index, and
-- a failed move that blocks its key is never finished history.
CREATE INDEX ix_moves_finished_at ON reactor.moves (finished_at) WHERE finished_at IS NOT NULL;

-- New columns go last so the public columns keep their positions.
CREATE OR REPLACE VIEW reactor.move_history AS
SELECT m.id AS move_id,
       m.order_key,
       m.seq,
       m.rule,
       m.source_bucket,
       m.source_key,
       NULLIF(m.source_version_id, '') AS source_version_id,
       m.etag,
       m.size,
       m.target_bucket,
       m.target_key,
       m.status::text AS status,
       m.attempts,
       m.last_error,
       m.enqueued_at,
       m.started_at,
       m.finished_at,
       m.worker,
       m.note,
       m.via,
       m.sequencer,
       m.blocking,
       m.run_after,
       m.event,
       m.target_etag
  FROM reactor.moves m;

-- One row per order key: where each task stands.
CREATE VIEW reactor.order_key_summary AS
SELECT k.order_key,
       count(m.id) FILTER (WHERE m.status = 'pending') AS pending,
       count(m.id) FILTER (WHERE m.status = 'running') AS running,
       count(m.id) FILTER (WHERE m.status = 'done') AS done,
       count(m.id) FILTER (WHERE m.status = 'superseded') AS superseded,
       count(m.id) FILTER (WHERE m.status = 'failed') AS failed,
       k.last_seq,
       max(m.seq) FILTER (WHERE m.status = 'done') AS highest_seq_done,
       now() - min(m.enqueued_at) FILTER (WHERE m.status = 'pending') AS oldest_pending_age,
       bool_or(m.blocking) IS TRUE AS blocked,
       max(m.finished_at) AS last_finished_at
  FROM reactor.order_keys k
  LEFT JOIN reactor.moves m ON m.order_key = k.order_key
 GROUP BY k.order_key, k.last_seq;

-- Every recorded step of every move, in time order, with what it was about.
CREATE VIEW reactor.move_timeline AS
SELECT e.at,
       e.move_id,
       e.kind,
       e.worker,
       e.detail,
       m.order_key,
       m.seq,
       m.rule,
       m.source_bucket,
       m.source_key,
       m.target_bucket,
       m.target_key,
       m.status::text AS move_status,
       e.id AS event_id
  FROM reactor.move_events e
  JOIN reactor.moves m ON m.id = e.move_id;

-- Read-only access for auditors: the views, nothing else. NOLOGIN: operators GRANT it to people.
-- Roles are cluster-wide, so another database's migration may have created it already.
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'reactor_auditor') THEN
        CREATE ROLE reactor_auditor NOLOGIN;
    END IF;
END $$;
GRANT USAGE ON SCHEMA reactor TO reactor_auditor;
GRANT SELECT ON reactor.move_history, reactor.order_key_summary, reactor.move_timeline TO reactor_auditor;
"""

DOWNGRADE = """
REVOKE ALL ON reactor.move_history, reactor.order_key_summary, reactor.move_timeline FROM reactor_auditor;
REVOKE USAGE ON SCHEMA reactor FROM reactor_auditor;
DROP VIEW reactor.move_timeline;
DROP VIEW reactor.order_key_summary;
DROP VIEW reactor.move_history;
CREATE VIEW reactor.move_history AS
SELECT m.id AS move_id, m.order_key, m.seq, m.rule, m.source_bucket, m.source_key,
       NULLIF(m.source_version_id, '') AS source_version_id, m.etag, m.size, m.target_bucket,
       m.target_key, m.status::text AS status, m.attempts, m.last_error, m.enqueued_at, m.started_at,
       m.finished_at, m.worker, m.note, m.via, m.sequencer, m.blocking, m.run_after
  FROM reactor.moves m;
DROP INDEX reactor.ix_moves_finished_at;
"""


def upgrade() -> None:
    op.execute(UPGRADE)


def downgrade() -> None:
    # The role is left in place: it is cluster-wide and other databases may use it.
    op.execute(DOWNGRADE)
