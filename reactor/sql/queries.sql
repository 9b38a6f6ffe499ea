-- The statements that carry the outbox's guarantees, loaded once by reactor/queries.py.
-- Each block starts with "-- name: <name>" and says why it is safe. Multi-statement
-- transitions (finish, lease recovery, key refresh) are PL/pgSQL functions created by
-- migrations/versions/0001_outbox.py; the statements here call them.
--
-- Lock order, everywhere: the key's row in reactor.order_keys first, then its moves.

-- name: enqueue_move
-- One upload, one move, numbered gap-free per order key.
--  * fresh: a notification of an upload that already has a move stops here, without touching
--    the counter (the common duplicate costs one index probe and no lock).
--  * counter: the upsert takes the key's row lock, so enqueuers of one key are serialized and
--    each gets last_seq + 1. The lock is held only by short transactions (enqueue, claim,
--    finish), never during a move, so enqueueing never waits for S3.
--  * A concurrent duplicate that slipped past `fresh` hits uq_moves_upload here and returns no
--    row; the caller then ROLLS BACK, which also undoes the counter bump: no gap.
--  * An open move (:open) becomes the key's head when the key had none: it is ready now, and
--    pg_notify (delivered at commit) wakes the pollers of every instance. A move that can
--    never run (its rendered target is unsafe) is recorded failed at once and takes its seq
--    without ever becoming a head.
WITH fresh AS (
    SELECT 1
     WHERE NOT EXISTS (
           SELECT 1 FROM reactor.moves
            WHERE source_bucket = :source_bucket AND source_key = :source_key
              AND source_version_id = :source_version_id AND etag = :etag AND modified_ms = :modified_ms)
), counter AS (
    INSERT INTO reactor.order_keys AS k (order_key, last_seq, head_seq, ready_at)
    SELECT :order_key, 1, CASE WHEN :open THEN 1 END, CASE WHEN :open THEN now() END FROM fresh
    ON CONFLICT (order_key) DO UPDATE
       SET last_seq = k.last_seq + 1,
           head_seq = CASE WHEN :open THEN coalesce(k.head_seq, k.last_seq + 1) ELSE k.head_seq END,
           ready_at = CASE WHEN :open AND k.head_seq IS NULL THEN now() ELSE k.ready_at END
    RETURNING k.last_seq AS seq, coalesce(k.head_seq = k.last_seq, false) AS is_head
), inserted AS (
    INSERT INTO reactor.moves (order_key, seq, rule, via, source_bucket, source_key, source_version_id,
                               etag, size, sequencer, modified_ms, target_bucket, target_key, event,
                               status, last_error, finished_at)
    SELECT :order_key, counter.seq, :rule, :via, :source_bucket, :source_key, :source_version_id,
           :etag, :size, :sequencer, :modified_ms, :target_bucket, :target_key, CAST(:event AS jsonb),
           CASE WHEN :open THEN 'pending' ELSE 'failed' END::reactor.move_status,
           :error, CASE WHEN :open THEN NULL ELSE clock_timestamp() END
      FROM counter
    ON CONFLICT ON CONSTRAINT uq_moves_upload DO NOTHING
    RETURNING id, seq
), audit AS (
    INSERT INTO reactor.move_events (move_id, kind, worker, detail)
    SELECT id, CASE WHEN :open THEN 'enqueued' ELSE 'failed' END, :worker,
           jsonb_strip_nulls(jsonb_build_object('via', CAST(:via AS text), 'seq', seq,
                                                'error', CAST(:error AS text)))
      FROM inserted
    RETURNING move_id
), wake AS (
    SELECT pg_notify('reactor_moves', '') FROM counter WHERE is_head
)
-- wake's count is selected on purpose: a read-only CTE nothing reads is never run, and the
-- planner drops an unused LEFT JOIN to it, which would silently skip the notify.
SELECT inserted.id, inserted.seq, counter.is_head, (SELECT count(*) FROM wake) AS woke
  FROM inserted CROSS JOIN counter;

-- name: claim_moves
-- Claim up to :limit heads of different keys, for this worker, under a lease.
--  * ready: only keys whose head may run now, read through the small partial index on
--    ready_at; FOR UPDATE SKIP LOCKED lets every instance claim concurrently without waiting
--    and without two of them taking the same key.
--  * claimed: the head must still be pending and nothing of its key running; the unique
--    partial index uq_moves_running_order_key would refuse a second running move anyway.
--    A fresh lease_token fences the finish: a worker whose lease was taken over cannot finish.
--  * newer_done: a later version of the same source key was already moved; copying this one
--    would put older bytes over newer ones, so the worker records it superseded.
WITH ready AS (
    SELECT k.order_key, k.head_seq
      FROM reactor.order_keys k
     WHERE k.ready_at <= now()
     ORDER BY k.ready_at
     LIMIT :limit
       FOR UPDATE SKIP LOCKED
), claimed AS (
    UPDATE reactor.moves m
       SET status = 'running',
           attempts = m.attempts + 1,
           started_at = coalesce(m.started_at, clock_timestamp()),
           worker = :worker,
           lease_token = gen_random_uuid(),
           lease_expires_at = clock_timestamp() + make_interval(secs => :lease_seconds)
      FROM ready
     WHERE m.order_key = ready.order_key AND m.seq = ready.head_seq AND m.status = 'pending'
       AND NOT EXISTS (SELECT 1 FROM reactor.moves r WHERE r.order_key = m.order_key AND r.status = 'running')
 RETURNING m.id, m.order_key, m.seq, m.rule, m.source_bucket, m.source_key, m.source_version_id, m.etag,
           m.size, m.sequencer, m.target_bucket, m.target_key, m.attempts, m.lease_token, m.target_etag
), unready AS (
    UPDATE reactor.order_keys k SET ready_at = NULL FROM claimed WHERE k.order_key = claimed.order_key
    RETURNING k.order_key
), audit AS (
    INSERT INTO reactor.move_events (move_id, kind, worker, detail)
    SELECT id, 'claimed', :worker, jsonb_build_object('attempt', attempts) FROM claimed
    RETURNING move_id
)
SELECT c.*,
       EXISTS (SELECT 1 FROM reactor.moves n
                WHERE n.source_bucket = c.source_bucket AND n.source_key = c.source_key
                  AND n.status = 'done' AND c.sequencer <> ''
                  AND n.sequencer COLLATE "C" > c.sequencer COLLATE "C") AS newer_done
  FROM claimed c
  LEFT JOIN (SELECT count(*) AS n FROM unready) u ON true
  LEFT JOIN (SELECT count(*) AS n FROM audit) a ON true
 ORDER BY c.id;

-- name: finish_move
-- Record an attempt's outcome; see reactor.finish_move in the migration: key lock first,
-- fenced by the lease token (returns false when this worker no longer owns the move).
SELECT reactor.finish_move(:move_id, :lease_token, CAST(:status AS reactor.move_status), :blocking,
                           :retry_delay, :error, :note, :target_etag, :kind, :worker,
                           CAST(:detail AS jsonb)) AS finished;

-- name: renew_leases
-- Heartbeat: extend the leases this worker still holds; a move missing from the result was
-- taken over (its lease expired) and its worker must stop touching it.
UPDATE reactor.moves m
   SET lease_expires_at = clock_timestamp() + make_interval(secs => :lease_seconds)
  FROM unnest(CAST(:move_ids AS bigint[]), CAST(:lease_tokens AS uuid[])) AS held(id, token)
 WHERE m.id = held.id AND m.lease_token = held.token AND m.status = 'running'
RETURNING m.id;

-- name: recover_expired
-- Give the moves of workers that stopped renewing their lease back to the queue.
SELECT reactor.recover_expired(:worker, :max_attempts, :block) AS recovered;

-- name: lock_key
-- Taken before any hand-made transition of a key's moves (retry), in the global lock order.
SELECT order_key FROM reactor.order_keys WHERE order_key = :order_key FOR UPDATE;

-- name: retry_move
-- Put a failed move back to pending (by hand). Its attempts start over; the audit trail keeps
-- every earlier attempt. The caller holds the key's lock and refreshes the key afterwards.
WITH retried AS (
    UPDATE reactor.moves
       SET status = 'pending', blocking = false, attempts = 0, finished_at = NULL,
           run_after = now(), lease_token = NULL, lease_expires_at = NULL
     WHERE id = :move_id AND status = 'failed'
    RETURNING id, order_key
), audit AS (
    INSERT INTO reactor.move_events (move_id, kind, worker, detail)
    SELECT id, 'retried', :worker, '{}'::jsonb FROM retried
    RETURNING move_id
)
SELECT r.id, r.order_key FROM retried r LEFT JOIN (SELECT count(*) AS n FROM audit) a ON true;

-- name: refresh_key
SELECT reactor.refresh_key(:order_key);

-- name: checkpoint_move
-- Remember the target ETag a multipart move proved equal, before its source is deleted;
-- fenced like finish, so only the lease holder writes it.
UPDATE reactor.moves SET target_etag = :target_etag
 WHERE id = :move_id AND lease_token = :lease_token AND status = 'running'
RETURNING id;

-- name: prune_finished
-- Retention: delete one batch of finished moves (their events go with them, ON DELETE CASCADE),
-- oldest first through ix_moves_finished_at. A failed move that blocks its key is not history.
-- Small batches keep each transaction short, so pruning never holds up the claim path.
WITH doomed AS (
    SELECT id FROM reactor.moves
     WHERE finished_at < now() - make_interval(secs => :older_than_seconds)
       AND NOT blocking
     ORDER BY finished_at
     LIMIT :batch
       FOR UPDATE SKIP LOCKED
)
DELETE FROM reactor.moves m USING doomed WHERE m.id = doomed.id
RETURNING m.id;

-- name: queue_gauges
-- Everything /metrics reports about the queue, in one cheap query over the open-move index.
SELECT count(*) FILTER (WHERE status = 'pending') AS pending,
       count(*) FILTER (WHERE status = 'running') AS running,
       count(*) FILTER (WHERE blocking) AS blocked,
       coalesce(extract(epoch FROM now() - min(enqueued_at) FILTER (WHERE status = 'pending')), 0)
           AS oldest_pending_seconds
  FROM reactor.moves
 WHERE status IN ('pending', 'running') OR blocking;
