"""The outbox's tables as SQLAlchemy metadata: the source of truth that migrations are checked against."""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Column,
    DateTime,
    Enum,
    ForeignKey,
    Identity,
    Index,
    Integer,
    MetaData,
    Table,
    Text,
    UniqueConstraint,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB, UUID

from reactor.domain import MoveStatus

SCHEMA = "reactor"

# Deterministic constraint names, so migrations and the compare test agree on them.
metadata = MetaData(
    schema=SCHEMA,
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    },
)

move_status = Enum(
    MoveStatus,
    name="move_status",
    schema=SCHEMA,
    values_callable=lambda enum: [member.value for member in enum],
    metadata=metadata,
)

# One row per order key ("the task"): the sequence counter and the key's claimable head.
# Claimers scan only rows whose ready_at is set, through a partial index that stays as small
# as the number of keys with runnable work, however long the history grows.
order_keys = Table(
    "order_keys",
    metadata,
    Column("order_key", Text, primary_key=True),
    Column("last_seq", BigInteger, nullable=False, server_default=text("0")),
    Column("head_seq", BigInteger, nullable=True),
    Column("ready_at", DateTime(timezone=True), nullable=True),
    Index("ix_order_keys_ready_at", "ready_at", postgresql_where=text("ready_at IS NOT NULL")),
)

moves = Table(
    "moves",
    metadata,
    Column("id", BigInteger, Identity(always=True), primary_key=True),
    Column("order_key", Text, ForeignKey("order_keys.order_key"), nullable=False),
    Column("seq", BigInteger, nullable=False),
    Column("rule", Text, nullable=False),
    Column("via", Text, nullable=False),
    Column("source_bucket", Text, nullable=False),
    Column("source_key", Text, nullable=False),
    Column("source_version_id", Text, nullable=False, server_default=text("''")),
    Column("etag", Text, nullable=False),
    Column("size", BigInteger, nullable=False),
    Column("sequencer", Text, nullable=False, server_default=text("''")),
    Column("modified_ms", BigInteger, nullable=False, server_default=text("0")),
    Column("target_bucket", Text, nullable=False),
    Column("target_key", Text, nullable=False),
    Column("status", move_status, nullable=False, server_default=text("'pending'")),
    Column("blocking", Boolean, nullable=False, server_default=text("false")),
    Column("attempts", Integer, nullable=False, server_default=text("0")),
    Column("run_after", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("lease_token", UUID(as_uuid=True), nullable=True),
    Column("lease_expires_at", DateTime(timezone=True), nullable=True),
    Column("last_error", Text, nullable=True),
    Column("note", Text, nullable=True),
    Column("target_etag", Text, nullable=True),
    Column("event", JSONB, nullable=True),
    Column("enqueued_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("started_at", DateTime(timezone=True), nullable=True),
    Column("finished_at", DateTime(timezone=True), nullable=True),
    Column("worker", Text, nullable=True),
    UniqueConstraint("order_key", "seq"),
    # One upload, one move: a repeated notification of the same upload never enqueues twice. The
    # upload's time is kept to the millisecond, the precision listings share with events.
    UniqueConstraint(
        "source_bucket", "source_key", "source_version_id", "etag", "modified_ms", name="uq_moves_upload"
    ),
    CheckConstraint("seq >= 1", name="seq_positive"),
    CheckConstraint("status <> 'running' OR lease_token IS NOT NULL", name="running_has_lease"),
    CheckConstraint("NOT blocking OR status = 'failed'", name="blocking_only_failed"),
    CheckConstraint(
        "(status IN ('done', 'superseded', 'failed')) = (finished_at IS NOT NULL)",
        name="finished_iff_terminal",
    ),
    CheckConstraint("via IN ('webhook', 'listen', 'sweep')", name="via_known"),
    # At most one running move per order key, across every instance: held by the database.
    Index(
        "uq_moves_running_order_key", "order_key", unique=True, postgresql_where=text("status = 'running'")
    ),
    # The open moves of a key (pending, running, or failed and blocking it), to find its head.
    Index(
        "ix_moves_open_order_key_seq",
        "order_key",
        "seq",
        postgresql_where=text("status IN ('pending', 'running') OR blocking"),
    ),
    # Expired leases are found among running moves only.
    Index("ix_moves_running_lease", "lease_expires_at", postgresql_where=text("status = 'running'")),
    Index("ix_moves_enqueued_at", "enqueued_at"),
    Index("ix_moves_status_failed", "id", postgresql_where=text("status = 'failed'")),
    # Retention prunes finished history oldest first, in batches.
    Index("ix_moves_finished_at", "finished_at", postgresql_where=text("finished_at IS NOT NULL")),
)

# Append-only audit trail: one row per state change and per attempt.
move_events = Table(
    "move_events",
    metadata,
    Column("id", BigInteger, Identity(always=True), primary_key=True),
    Column("move_id", BigInteger, ForeignKey("moves.id", ondelete="CASCADE"), nullable=False),
    Column("at", DateTime(timezone=True), nullable=False, server_default=func.clock_timestamp()),
    Column("kind", Text, nullable=False),
    Column("worker", Text, nullable=True),
    Column("detail", JSONB, nullable=False, server_default=text("'{}'::jsonb")),
    Index("ix_move_events_move_id_at", "move_id", "at"),
)
