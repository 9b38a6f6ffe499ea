"""Batched transitions: enqueue many, finish many, and finish-then-claim, each one round trip.

The service called one statement per state change, each in BEGIN ... COMMIT: about eight round
trips per move. These functions let it enqueue a whole batch of notifications, and record every
finished move and claim the next ones, in a single statement run in autocommit mode.

Lock order, as before: a key's row in reactor.order_keys first, then its moves. A batch that locks
several keys takes them in order_key order, so two batches never wait for each other in a cycle;
claims and lease recovery take keys with SKIP LOCKED and never wait at all.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-04
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

UPGRADE = """
-- enqueue_moves: one upload, one move, numbered gap-free per order key, for a batch of uploads.
-- p_moves is a JSON array of objects (idx, order_key, rule, via, source_bucket, source_key,
-- source_version_id, etag, size, sequencer, modified_ms, target_bucket, target_key, event, error);
-- a row comes back for each upload recorded now (o_idx names it), none for a duplicate.
--  * The common duplicate costs one index probe and takes no lock.
--  * Two instances whose rules put the same upload under DIFFERENT keys (a rules change rolled
--    out to one instance first) can deadlock here; PostgreSQL aborts one, and its caller retries
--    as after any database error (the webhook answers 503, the listener tries again).
--  * Otherwise the key's row is locked first (created when new), and the duplicate check is
--    repeated under that lock: every enqueuer of an upload locks the same key, so a duplicate
--    committed meanwhile is seen now. The counter moves only once the move row is in, so a
--    refused insert leaves no gap.
--  * An open move (no error) becomes its key's head when the key had none: it is ready now, and
--    pg_notify (delivered at commit, once per batch) wakes the pollers of every instance. A move
--    that can never run (its rendered target is unsafe) is recorded failed at once and takes its
--    seq without ever becoming a head.
CREATE FUNCTION reactor.enqueue_moves(p_moves jsonb, p_worker text)
RETURNS TABLE (o_idx integer, o_move_id bigint, o_seq bigint, o_is_head boolean)
LANGUAGE plpgsql AS $$
DECLARE
    r record;
    v_last bigint;
    v_head bigint;
    v_open boolean;
    v_id bigint;
    v_woke boolean := false;
BEGIN
    FOR r IN
        SELECT x.*
          FROM jsonb_to_recordset(p_moves) AS x(
               idx integer, order_key text, rule text, via text, source_bucket text, source_key text,
               source_version_id text, etag text, size bigint, sequencer text, modified_ms bigint,
               target_bucket text, target_key text, event jsonb, error text)
         ORDER BY x.order_key, x.idx
    LOOP
        CONTINUE WHEN EXISTS (
            SELECT 1 FROM reactor.moves m
             WHERE m.source_bucket = r.source_bucket AND m.source_key = r.source_key
               AND m.source_version_id = r.source_version_id AND m.etag = r.etag
               AND m.modified_ms = r.modified_ms);
        SELECT k.last_seq, k.head_seq INTO v_last, v_head
          FROM reactor.order_keys k WHERE k.order_key = r.order_key FOR UPDATE;
        IF NOT FOUND THEN
            INSERT INTO reactor.order_keys (order_key) VALUES (r.order_key) ON CONFLICT DO NOTHING;
            SELECT k.last_seq, k.head_seq INTO v_last, v_head
              FROM reactor.order_keys k WHERE k.order_key = r.order_key FOR UPDATE;
        END IF;
        CONTINUE WHEN EXISTS (
            SELECT 1 FROM reactor.moves m
             WHERE m.source_bucket = r.source_bucket AND m.source_key = r.source_key
               AND m.source_version_id = r.source_version_id AND m.etag = r.etag
               AND m.modified_ms = r.modified_ms);
        v_open := r.error IS NULL;
        -- ON CONFLICT only for an enqueuer that put this upload under ANOTHER key (instances
        -- running different rules): the upload keeps its first move, and this key no gap.
        INSERT INTO reactor.moves AS m (order_key, seq, rule, via, source_bucket, source_key,
                                        source_version_id, etag, size, sequencer, modified_ms,
                                        target_bucket, target_key, event, status, last_error,
                                        finished_at)
        VALUES (r.order_key, v_last + 1, r.rule, r.via, r.source_bucket, r.source_key,
                coalesce(r.source_version_id, ''), r.etag, r.size, coalesce(r.sequencer, ''),
                r.modified_ms, r.target_bucket, r.target_key, r.event,
                CASE WHEN v_open THEN 'pending' ELSE 'failed' END::reactor.move_status,
                r.error, CASE WHEN v_open THEN NULL ELSE clock_timestamp() END)
        ON CONFLICT ON CONSTRAINT uq_moves_upload DO NOTHING
        RETURNING m.id INTO v_id;
        CONTINUE WHEN v_id IS NULL;
        UPDATE reactor.order_keys k
           SET last_seq = v_last + 1,
               head_seq = CASE WHEN v_open AND v_head IS NULL THEN v_last + 1 ELSE v_head END,
               ready_at = CASE WHEN v_open AND v_head IS NULL THEN now() ELSE k.ready_at END
         WHERE k.order_key = r.order_key;
        INSERT INTO reactor.move_events (move_id, kind, worker, detail)
        VALUES (v_id, CASE WHEN v_open THEN 'enqueued' ELSE 'failed' END, p_worker,
                jsonb_strip_nulls(jsonb_build_object('via', r.via, 'seq', v_last + 1, 'error', r.error)));
        IF v_open AND v_head IS NULL AND NOT v_woke THEN
            PERFORM pg_notify('reactor_moves', '');
            v_woke := true;
        END IF;
        o_idx := r.idx;
        o_move_id := v_id;
        o_seq := v_last + 1;
        o_is_head := v_open AND v_head IS NULL;
        RETURN NEXT;
    END LOOP;
END $$;

-- claim_moves: claim up to p_limit heads of different keys, for this worker, under a lease.
--  * ready: only keys whose head may run now, read through the small partial index on
--    ready_at; FOR UPDATE SKIP LOCKED lets every instance claim concurrently without waiting
--    and without two of them taking the same key.
--  * claimed: the head must still be pending and nothing of its key running; the unique
--    partial index uq_moves_running_order_key would refuse a second running move anyway.
--    A fresh lease_token fences the finish: a worker whose lease was taken over cannot finish.
--  * unready: the claimed keys leave the ready index, found by primary key (= ANY of an array,
--    so the planner never hashes the whole key table).
--  * newer_done: a later version of the same source key was already moved; copying this one
--    would put older bytes over newer ones, so the worker records it superseded.
CREATE FUNCTION reactor.claim_moves(p_worker text, p_limit integer, p_lease_seconds double precision)
RETURNS TABLE (id bigint, order_key text, seq bigint, rule text, source_bucket text, source_key text,
               source_version_id text, etag text, size bigint, sequencer text, target_bucket text,
               target_key text, attempts integer, lease_token uuid, target_etag text, newer_done boolean)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    -- The clock, not now(): after finish_moves in the same transaction, a head made ready by an
    -- enqueue that committed while this transaction waited for a key lock is claimable too. A
    -- variable, so the comparison is still an index condition.
    v_now timestamptz := clock_timestamp();
BEGIN
    RETURN QUERY
    WITH ready AS (
        SELECT k.order_key, k.head_seq
          FROM reactor.order_keys k
         WHERE k.ready_at <= v_now
         ORDER BY k.ready_at
         LIMIT p_limit
           FOR UPDATE SKIP LOCKED
    ), claimed AS (
        UPDATE reactor.moves m
           SET status = 'running',
               attempts = m.attempts + 1,
               started_at = coalesce(m.started_at, clock_timestamp()),
               worker = p_worker,
               lease_token = gen_random_uuid(),
               lease_expires_at = clock_timestamp() + make_interval(secs => p_lease_seconds)
          FROM ready
         WHERE m.order_key = ready.order_key AND m.seq = ready.head_seq AND m.status = 'pending'
           AND NOT EXISTS (SELECT 1 FROM reactor.moves r
                            WHERE r.order_key = m.order_key AND r.status = 'running')
     RETURNING m.id, m.order_key, m.seq, m.rule, m.source_bucket, m.source_key, m.source_version_id,
               m.etag, m.size, m.sequencer, m.target_bucket, m.target_key, m.attempts, m.lease_token,
               m.target_etag
    ), unready AS (
        UPDATE reactor.order_keys k SET ready_at = NULL
         WHERE k.order_key = ANY (ARRAY(SELECT c.order_key FROM claimed c))
        RETURNING k.order_key
    ), audit AS (
        INSERT INTO reactor.move_events (move_id, kind, worker, detail)
        SELECT c.id, 'claimed', p_worker, jsonb_build_object('attempt', c.attempts) FROM claimed c
        RETURNING move_id
    )
    SELECT c.id, c.order_key, c.seq, c.rule, c.source_bucket, c.source_key, c.source_version_id,
           c.etag, c.size, c.sequencer, c.target_bucket, c.target_key, c.attempts, c.lease_token,
           c.target_etag,
           EXISTS (SELECT 1 FROM reactor.moves n
                    WHERE n.source_bucket = c.source_bucket AND n.source_key = c.source_key
                      AND n.status = 'done' AND c.sequencer <> ''
                      AND n.sequencer COLLATE "C" > c.sequencer COLLATE "C")
      FROM claimed c
      LEFT JOIN (SELECT count(*) AS n FROM unready) u ON true
      LEFT JOIN (SELECT count(*) AS n FROM audit) a ON true
     ORDER BY c.id;
END $$;

-- refresh_keys: the set form of refresh_key (which now calls it): recompute each key's head (its
-- lowest open move) and when it may be claimed. Callers hold the keys' row locks. ready_at is set
-- only when the head is pending and nothing of the key runs: a move retried by hand below a
-- running one waits for it.
CREATE FUNCTION reactor.refresh_keys(p_keys text[]) RETURNS void LANGUAGE sql AS $$
    UPDATE reactor.order_keys k
       SET head_seq = h.seq,
           ready_at = CASE
               WHEN h.status = 'pending' AND NOT EXISTS (
                   SELECT 1 FROM reactor.moves r WHERE r.order_key = k.order_key AND r.status = 'running')
               THEN h.run_after
           END
      FROM unnest(p_keys) AS u(order_key)
      LEFT JOIN LATERAL (
            SELECT m.seq, m.status, m.run_after
              FROM reactor.moves m
             WHERE m.order_key = u.order_key AND (m.status IN ('pending', 'running') OR m.blocking)
             ORDER BY m.seq
             LIMIT 1
      ) AS h ON true
     WHERE k.order_key = u.order_key
$$;

CREATE OR REPLACE FUNCTION reactor.refresh_key(p_key text) RETURNS void LANGUAGE sql AS $$
    SELECT reactor.refresh_keys(ARRAY[p_key])
$$;

-- finish_moves: record the outcomes of a batch of attempts, set-based; returns the ids recorded.
-- The same transition as reactor.finish_move, for many moves in three statements:
--  * the keys' rows are locked first, in order_key order (enqueue locks them the same way), so
--    the heads computed afterwards see every move enqueued before;
--  * each move changes only if it is still running under the caller's lease token: a worker
--    whose lease was taken over changes nothing, and its id is missing from the result;
--  * one audit event per recorded outcome; then the keys' heads are refreshed.
-- p_finishes is a JSON array of objects (id, lease_token, status, blocking, retry_delay, error,
-- note, target_etag, kind, detail).
CREATE FUNCTION reactor.finish_moves(p_finishes jsonb, p_worker text)
RETURNS SETOF bigint
LANGUAGE plpgsql AS $$
DECLARE
    v_keys text[];
    v_ids bigint[];
BEGIN
    PERFORM 1
       FROM reactor.order_keys k
      WHERE k.order_key = ANY (ARRAY(SELECT m.order_key
                                       FROM jsonb_to_recordset(p_finishes) AS f(id bigint)
                                       JOIN reactor.moves m ON m.id = f.id))
      ORDER BY k.order_key
        FOR UPDATE OF k;
    -- Then the moves' rows, in id order, as renew_leases takes them: a heartbeat renewing some
    -- of the same rows never waits for this batch in a cycle.
    PERFORM 1
       FROM reactor.moves m
      WHERE m.id = ANY (ARRAY(SELECT f.id FROM jsonb_to_recordset(p_finishes) AS f(id bigint)))
      ORDER BY m.id
        FOR UPDATE OF m;
    WITH f AS (
        SELECT *
          FROM jsonb_to_recordset(p_finishes) AS f(
               id bigint, lease_token uuid, status reactor.move_status, blocking boolean,
               retry_delay double precision, error text, note text, target_etag text, kind text,
               detail jsonb)
    ), recorded AS (
        UPDATE reactor.moves m
           SET status = f.status,
               blocking = coalesce(f.blocking, false),
               run_after = CASE WHEN f.status = 'pending'
                                THEN clock_timestamp() + make_interval(secs => coalesce(f.retry_delay, 0))
                                ELSE m.run_after END,
               finished_at = CASE WHEN f.status IN ('done', 'superseded', 'failed')
                                  THEN clock_timestamp() END,
               last_error = coalesce(f.error, m.last_error),
               note = coalesce(f.note, m.note),
               target_etag = coalesce(f.target_etag, m.target_etag),
               lease_token = NULL,
               lease_expires_at = NULL
          FROM f
         WHERE m.id = f.id AND m.status = 'running' AND m.lease_token = f.lease_token
        RETURNING m.id, m.order_key, f.kind, f.detail
    ), audit AS (
        INSERT INTO reactor.move_events (move_id, kind, worker, detail)
        SELECT r.id, r.kind, p_worker, coalesce(r.detail, '{}'::jsonb) FROM recorded r
        RETURNING move_id
    )
    SELECT array_agg(r.id), array_agg(DISTINCT r.order_key) INTO v_ids, v_keys
      FROM recorded r LEFT JOIN (SELECT count(*) AS n FROM audit) a ON true;
    IF v_ids IS NULL THEN
        RETURN;
    END IF;
    PERFORM reactor.refresh_keys(v_keys);
    RETURN QUERY SELECT unnest(v_ids);
END $$;

-- finish_move (0001) becomes the one-move form of finish_moves, so the transition is written once.
CREATE OR REPLACE FUNCTION reactor.finish_move(
    p_move_id bigint, p_lease uuid, p_status reactor.move_status, p_blocking boolean,
    p_retry_delay double precision, p_error text, p_note text, p_target_etag text,
    p_kind text, p_worker text, p_detail jsonb
) RETURNS boolean LANGUAGE sql AS $$
    SELECT EXISTS (
        SELECT 1
          FROM reactor.finish_moves(
               jsonb_build_array(jsonb_build_object(
                   'id', p_move_id, 'lease_token', p_lease, 'status', p_status,
                   'blocking', p_blocking, 'retry_delay', p_retry_delay, 'error', p_error,
                   'note', p_note, 'target_etag', p_target_etag, 'kind', p_kind,
                   'detail', p_detail)),
               p_worker))
$$;

-- finish_and_claim: the poller's one round trip per cycle. Records every finished attempt, then
-- claims up to p_limit heads; a key whose next move became ready by a finish here is claimable
-- at once (this transaction already holds its lock). Rows with finished_id set name recorded
-- finishes; the other rows are claims (the columns of claim_moves).
CREATE FUNCTION reactor.finish_and_claim(p_finishes jsonb, p_worker text, p_limit integer,
                                         p_lease_seconds double precision)
RETURNS TABLE (finished_id bigint, id bigint, order_key text, seq bigint, rule text,
               source_bucket text, source_key text, source_version_id text, etag text, size bigint,
               sequencer text, target_bucket text, target_key text, attempts integer,
               lease_token uuid, target_etag text, newer_done boolean)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
BEGIN
    IF jsonb_array_length(p_finishes) > 0 THEN
        RETURN QUERY
        SELECT f.f, NULL::bigint, NULL::text, NULL::bigint, NULL::text, NULL::text, NULL::text,
               NULL::text, NULL::text, NULL::bigint, NULL::text, NULL::text, NULL::text,
               NULL::integer, NULL::uuid, NULL::text, NULL::boolean
          FROM reactor.finish_moves(p_finishes, p_worker) AS f(f);
    END IF;
    IF p_limit > 0 THEN
        RETURN QUERY SELECT NULL::bigint, c.* FROM reactor.claim_moves(p_worker, p_limit, p_lease_seconds) c;
    END IF;
END $$;
"""

DOWNGRADE = """
DROP FUNCTION reactor.finish_and_claim(jsonb, text, integer, double precision);
-- finish_move as 0001 created it
CREATE OR REPLACE FUNCTION reactor.finish_move(
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
DROP FUNCTION reactor.finish_moves(jsonb, text);
-- refresh_key as 0001 created it
CREATE OR REPLACE FUNCTION reactor.refresh_key(p_key text) RETURNS void LANGUAGE sql AS $$
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
DROP FUNCTION reactor.refresh_keys(text[]);
DROP FUNCTION reactor.claim_moves(text, integer, double precision);
DROP FUNCTION reactor.enqueue_moves(jsonb, text);
"""


def upgrade() -> None:
    op.execute(UPGRADE)


def downgrade() -> None:
    op.execute(DOWNGRADE)
