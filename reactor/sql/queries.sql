-- The statements that carry the outbox's guarantees, loaded once by reactor/queries.py.
-- Each block starts with "-- name: <name>" and says why it is safe. Multi-statement
-- transitions (enqueue, claim, finish, lease recovery, key refresh) are PL/pgSQL functions created
-- by migrations/versions/0001_outbox.py and 0003_batched_transitions.py; the statements here call
-- them. Each statement is one round trip and, run in autocommit mode, its own transaction.
--
-- Lock order, everywhere: the key's row in reactor.order_keys first, then its moves; a statement
-- that locks several keys and waits for them takes them in order_key order.

-- name: enqueue_moves
-- A batch of uploads, one move each, numbered gap-free per order key; duplicates return no row.
-- See reactor.enqueue_moves in migrations/versions/0003_batched_transitions.py: the common
-- duplicate costs one index probe; otherwise the key's row is locked first, the duplicate check
-- repeated under it, and the counter moves only once the move row is in. Keys are locked in
-- order_key order. Run in autocommit: the statement is its own transaction, one round trip.
SELECT o_idx AS idx, o_move_id AS id, o_seq AS seq, o_is_head AS is_head
  FROM reactor.enqueue_moves(CAST(:moves AS jsonb), :worker);

-- name: claim_moves
-- Claim up to :limit heads of different keys, for this worker, under a lease (see
-- reactor.claim_moves in migration 0003: ready keys through the partial index on ready_at,
-- FOR UPDATE SKIP LOCKED, a fresh lease token per claim, newer_done for stale versions).
SELECT * FROM reactor.claim_moves(:worker, :limit, :lease_seconds);

-- name: finish_and_claim
-- The poller's cycle in one round trip: record every finished attempt (reactor.finish_move for
-- each, key lock first, fenced by the lease token), then claim up to :limit heads. Rows with
-- finished_id set name the recorded finishes; a finish missing from them was fenced (its lease
-- was taken over). The other rows are claims. :limit 0 only records.
SELECT * FROM reactor.finish_and_claim(CAST(:finishes AS jsonb), :worker, :limit, :lease_seconds);

-- name: renew_leases
-- Heartbeat: extend the leases this worker still holds; a move missing from the result was
-- taken over (or its lease already ran out) and its worker must stop touching it.
--  * Rows are locked in id order, as finish_moves locks them, so a heartbeat and a batch finish
--    of the same worker never deadlock.
--  * An expired lease is not renewed: recover_expired may be giving it back right now (and
--    skipping expired rows here means never waiting for it, whose lock order differs).
WITH held AS (
    SELECT m.id
      FROM reactor.moves m
      JOIN unnest(CAST(:move_ids AS bigint[]), CAST(:lease_tokens AS uuid[])) AS h(id, token)
        ON m.id = h.id AND m.lease_token = h.token
     WHERE m.status = 'running' AND m.lease_expires_at > clock_timestamp()
     ORDER BY m.id
       FOR UPDATE OF m
)
UPDATE reactor.moves m
   SET lease_expires_at = clock_timestamp() + make_interval(secs => :lease_seconds)
  FROM held
 WHERE m.id = held.id
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
