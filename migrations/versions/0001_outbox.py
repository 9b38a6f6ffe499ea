"""The outbox: order keys, moves, the audit trail, the transition functions and move_history.

Revision ID: 0001
Revises:
Create Date: 2026-12-04
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TABLES = """
CREATE TYPE reactor.move_status AS ENUM ('pending', 'running', 'done', 'superseded', 'failed');

CREATE TABLE reactor.order_keys (
    order_key text NOT NULL,
    last_seq  bigint DEFAULT 0 NOT NULL,
    head_seq  bigint,
    ready_at  timestamptz,
    CONSTRAINT pk_order_keys PRIMARY KEY (order_key)
);
-- Claimers read only keys with runnable work: this index stays as small as that set.
CREATE INDEX ix_order_keys_ready_at ON reactor.order_keys (ready_at) WHERE ready_at IS NOT NULL;

CREATE TABLE reactor.moves (
    id                bigint GENERATED ALWAYS AS IDENTITY,
    order_key         text NOT NULL,
    seq               bigint NOT NULL,
    rule              text NOT NULL,
    via               text NOT NULL,
    source_bucket     text NOT NULL,
    source_key        text NOT NULL,
    source_version_id text DEFAULT '' NOT NULL,
    etag              text NOT NULL,
    size              bigint NOT NULL,
    sequencer         text DEFAULT '' NOT NULL,
    modified_ms       bigint DEFAULT 0 NOT NULL,
    target_bucket     text NOT NULL,
    target_key        text NOT NULL,
    status            reactor.move_status DEFAULT 'pending' NOT NULL,
    blocking          boolean DEFAULT false NOT NULL,
    attempts          integer DEFAULT 0 NOT NULL,
    run_after         timestamptz DEFAULT now() NOT NULL,
    lease_token       uuid,
    lease_expires_at  timestamptz,
    last_error        text,
    note              text,
    target_etag       text,
    event             jsonb,
    enqueued_at       timestamptz DEFAULT now() NOT NULL,
    started_at        timestamptz,
    finished_at       timestamptz,
    worker            text,
    CONSTRAINT pk_moves PRIMARY KEY (id),
    CONSTRAINT fk_moves_order_key_order_keys FOREIGN KEY (order_key)
        REFERENCES reactor.order_keys (order_key),
    CONSTRAINT uq_moves_order_key_seq UNIQUE (order_key, seq),
    -- One upload, one move. Its time to the millisecond: events carry nanoseconds (the sequencer),
    -- listings milliseconds, and both must name the same upload.
    CONSTRAINT uq_moves_upload UNIQUE (source_bucket, source_key, source_version_id, etag, modified_ms),
    CONSTRAINT ck_moves_seq_positive CHECK (seq >= 1),
    CONSTRAINT ck_moves_running_has_lease CHECK (status <> 'running' OR lease_token IS NOT NULL),
    CONSTRAINT ck_moves_blocking_only_failed CHECK (NOT blocking OR status = 'failed'),
    CONSTRAINT ck_moves_finished_iff_terminal
        CHECK ((status IN ('done', 'superseded', 'failed')) = (finished_at IS NOT NULL)),
    CONSTRAINT ck_moves_via_known CHECK (via IN ('webhook', 'listen', 'sweep'))
);
-- The database itself allows at most one running move per order key, whatever the instances do.
CREATE UNIQUE INDEX uq_moves_running_order_key ON reactor.moves (order_key) WHERE status = 'running';
-- A key's head is its lowest open move; finished history never enters this index.
CREATE INDEX ix_moves_open_order_key_seq ON reactor.moves (order_key, seq)
    WHERE status IN ('pending', 'running') OR blocking;
CREATE INDEX ix_moves_running_lease ON reactor.moves (lease_expires_at) WHERE status = 'running';
CREATE INDEX ix_moves_enqueued_at ON reactor.moves (enqueued_at);
CREATE INDEX ix_moves_status_failed ON reactor.moves (id) WHERE status = 'failed';

CREATE TABLE reactor.move_events (
    id      bigint GENERATED ALWAYS AS IDENTITY,
    move_id bigint NOT NULL,
    at      timestamptz DEFAULT clock_timestamp() NOT NULL,
    kind    text NOT NULL,
    worker  text,
    detail  jsonb DEFAULT '{}'::jsonb NOT NULL,
    CONSTRAINT pk_move_events PRIMARY KEY (id),
    CONSTRAINT fk_move_events_move_id_moves FOREIGN KEY (move_id)
        REFERENCES reactor.moves (id) ON DELETE CASCADE
);
CREATE INDEX ix_move_events_move_id_at ON reactor.move_events (move_id, at);

-- The audit trail is append-only: rows are written once and never rewritten.
CREATE FUNCTION reactor.forbid_update() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'reactor.% is append-only: insert a new event instead of updating one', TG_TABLE_NAME;
END $$;
CREATE TRIGGER move_events_append_only BEFORE UPDATE ON reactor.move_events
    FOR EACH ROW EXECUTE FUNCTION reactor.forbid_update();
"""

# The transitions that need more than one statement live here, so each is one round trip and each
# statement inside sees a fresh snapshot (READ COMMITTED, volatile functions).
FUNCTIONS = """
-- refresh_key: recompute a key's head (its lowest open move) and when it may be claimed.
-- Callers hold the key's row lock, so no enqueue or claim of this key runs in between.
-- ready_at is set only when the head is pending and nothing of the key runs: a move that is
-- retried by hand below a running one waits for it.
CREATE FUNCTION reactor.refresh_key(p_key text) RETURNS void LANGUAGE sql AS $$
    UPDATE reactor.order_keys k
       SET head_seq = h.seq,
           ready_at = CASE
               WHEN h.status = 'pending' AND NOT EXISTS (
                   SELECT 1 FROM reactor.moves r WHERE r.order_key = p_key AND r.status = 'running')
               THEN h.run_after
           END
      FROM (SELECT 1) AS one
      LEFT JOIN LATERAL (
            SELECT m.seq, m.status, m.run_after
              FROM reactor.moves m
             WHERE m.order_key = p_key AND (m.status IN ('pending', 'running') OR m.blocking)
             ORDER BY m.seq
             LIMIT 1
      ) AS h ON true
     WHERE k.order_key = p_key
$$;

-- finish_move: record the outcome of one attempt, fenced by the lease token.
-- The key's row is locked first, exactly as enqueue locks it, so the head computed afterwards
-- sees every move enqueued before; a worker whose lease was taken over changes nothing.
CREATE FUNCTION reactor.finish_move(
    p_move_id bigint, p_lease uuid, p_status reactor.move_status, p_blocking boolean,
    p_retry_delay double precision, p_error text, p_note text, p_target_etag text,
    p_kind text, p_worker text, p_detail jsonb
) RETURNS boolean LANGUAGE plpgsql AS $$
DECLARE
    v_key text;
BEGIN
    SELECT order_key INTO v_key FROM reactor.moves WHERE id = p_move_id;
    IF v_key IS NULL THEN
        RETURN false;
    END IF;
    PERFORM 1 FROM reactor.order_keys WHERE order_key = v_key FOR UPDATE;
    UPDATE reactor.moves
       SET status = p_status,
           blocking = p_blocking,
           run_after = CASE WHEN p_status = 'pending'
                            THEN clock_timestamp() + make_interval(secs => p_retry_delay)
                            ELSE run_after END,
           finished_at = CASE WHEN p_status IN ('done', 'superseded', 'failed') THEN clock_timestamp() END,
           last_error = coalesce(p_error, last_error),
           note = coalesce(p_note, note),
           target_etag = coalesce(p_target_etag, target_etag),
           lease_token = NULL,
           lease_expires_at = NULL
     WHERE id = p_move_id AND status = 'running' AND lease_token = p_lease;
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    INSERT INTO reactor.move_events (move_id, kind, worker, detail)
    VALUES (p_move_id, p_kind, p_worker, p_detail);
    PERFORM reactor.refresh_key(v_key);
    RETURN true;
END $$;

-- recover_expired: give the running moves of workers that stopped renewing their lease (crash,
-- kill -9, partition) back to the queue. The lost attempt counts, so a move that kills every
-- worker that runs it ends failed instead of looping forever.
CREATE FUNCTION reactor.recover_expired(p_worker text, p_max_attempts integer, p_block boolean)
RETURNS integer LANGUAGE plpgsql AS $$
DECLARE
    r record;
    v_failed boolean;
    n integer := 0;
BEGIN
    FOR r IN
        SELECT id, order_key, lease_token, worker, attempts
          FROM reactor.moves
         WHERE status = 'running' AND lease_expires_at < clock_timestamp()
         ORDER BY lease_expires_at
         LIMIT 1000
    LOOP
        PERFORM 1 FROM reactor.order_keys WHERE order_key = r.order_key FOR UPDATE SKIP LOCKED;
        CONTINUE WHEN NOT FOUND;
        v_failed := r.attempts >= p_max_attempts;
        UPDATE reactor.moves
           SET status = CASE WHEN v_failed THEN 'failed' ELSE 'pending' END::reactor.move_status,
               blocking = v_failed AND p_block,
               finished_at = CASE WHEN v_failed THEN clock_timestamp() END,
               run_after = clock_timestamp(),
               last_error = format('worker %s stopped renewing its lease during attempt %s',
                                   r.worker, r.attempts),
               lease_token = NULL,
               lease_expires_at = NULL
         WHERE id = r.id AND status = 'running' AND lease_token = r.lease_token
           AND lease_expires_at < clock_timestamp();
        CONTINUE WHEN NOT FOUND;
        INSERT INTO reactor.move_events (move_id, kind, worker, detail)
        VALUES (r.id, 'lease_expired', p_worker,
                jsonb_build_object('previous_worker', r.worker, 'attempt', r.attempts,
                                   'status', CASE WHEN v_failed THEN 'failed' ELSE 'pending' END));
        PERFORM reactor.refresh_key(r.order_key);
        n := n + 1;
    END LOOP;
    RETURN n;
END $$;
"""

VIEWS = """
-- One row per move: the public, stable face of the outbox for auditors and the CLI.
CREATE VIEW reactor.move_history AS
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
       m.run_after
  FROM reactor.moves m;
"""


def upgrade() -> None:
    op.execute(TABLES)
    op.execute(FUNCTIONS)
    op.execute(VIEWS)


def downgrade() -> None:
    op.execute("DROP VIEW reactor.move_history")
    op.execute("DROP FUNCTION reactor.recover_expired(text, integer, boolean)")
    op.execute(
        "DROP FUNCTION reactor.finish_move(bigint, uuid, reactor.move_status, boolean, double precision,"
        " text, text, text, text, text, jsonb)"
    )
    op.execute("DROP FUNCTION reactor.refresh_key(text)")
    op.execute("DROP TABLE reactor.move_events")
    op.execute("DROP FUNCTION reactor.forbid_update()")
    op.execute("DROP TABLE reactor.moves")
    op.execute("DROP TABLE reactor.order_keys")
    op.execute("DROP TYPE reactor.move_status")
