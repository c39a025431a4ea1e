-- The webhook outbox's hot path (webhooks/outbox.py): one statement, so one round trip with
-- no BEGIN or COMMIT around it, records the attempts a worker made since its last one, leases
-- the deliveries due now and finds when the next one falls due.

-- name: pass
-- Record the attempts $2 (JSON, an object per attempt): of delivery `delivery_id`, leased
-- under `lease_token`, made at `attempted_at`, answered `status_code` in `latency_ms` ms,
-- `error`, `response_snippet`; the delivery's next `status` and, if pending, when it is due
-- again, `next_attempt_at`. Each is logged; the delivery moves on only where its lease held
-- (else another worker owns it now). (JSON, not an array per field: asyncpg checks every
-- element of an array against collections.abc in Python: a fifth of the pass's CPU.)
-- Then lease up to $3 deliveries due at $1 (a lease that ran out counting as due), skipping
-- the hosts $4 and taking per receiver host only as many as $7 minus those the caller has
-- in flight there ($5 hosts, $6 their counts); the lease runs to $8 under token $9. The
-- candidates are locked SKIP LOCKED, so processes claiming side by side never share one.
-- A row per delivery leased (none: one row of nulls), its fields as the worker needs them
-- (jobs/deliveries.py `OutgoingDelivery`), each with `next_due`: when the earliest delivery
-- still pending, not for a host now full, can next be claimed (null if none, or when the
-- lease took all $3), and `kept`, the recorded deliveries whose lease held.
WITH attempt AS (
    SELECT * FROM jsonb_to_recordset($2::jsonb)
        AS attempt (delivery_id uuid, lease_token uuid, attempted_at timestamptz,
                    status_code int, latency_ms int, error text, response_snippet text,
                    status text, next_attempt_at timestamptz)
), logged AS (
    INSERT INTO webhook_attempts
        (delivery_id, attempted_at, status_code, latency_ms, error, response_snippet)
    SELECT delivery_id, attempted_at, status_code, latency_ms, error, response_snippet
    FROM attempt
), recorded AS (
    UPDATE webhook_deliveries AS d
    SET status = attempt.status, next_attempt_at = attempt.next_attempt_at,
        attempts = d.attempts + 1, locked_until = NULL, lease_token = NULL,
        last_status_code = attempt.status_code, last_error = attempt.error
    FROM attempt
    WHERE d.id = attempt.delivery_id AND d.lease_token = attempt.lease_token
    RETURNING d.id, d.host, d.status, d.next_attempt_at
), busy AS (
    SELECT * FROM unnest($5::text[], $6::int[]) AS busy (host, count)
), candidates AS (
    -- Not a delivery recorded above: one statement changes a row once.
    SELECT id, host, next_attempt_at
    FROM webhook_deliveries
    WHERE status = 'pending'
      AND next_attempt_at <= $1
      AND (locked_until IS NULL OR locked_until <= $1)
      AND host <> ALL($4::text[])
      AND id NOT IN (SELECT delivery_id FROM attempt)
    ORDER BY next_attempt_at
    LIMIT $3
    FOR UPDATE SKIP LOCKED
), ranked AS (
    SELECT id, host, row_number() OVER (PARTITION BY host ORDER BY next_attempt_at) AS place
    FROM candidates
), leased AS (
    UPDATE webhook_deliveries AS d
    SET locked_until = $8, lease_token = $9
    FROM ranked LEFT JOIN busy ON busy.host = ranked.host
    WHERE d.id = ranked.id AND coalesce(busy.count, 0) + ranked.place <= $7
    RETURNING d.id, d.job_id, d.event_type, d.message_id, d.url, d.host, d.payload, d.attempts,
        d.pending_since, d.locked_until, d.lease_token
), taken AS (
    SELECT host, count(*) AS count FROM leased GROUP BY host
), full_hosts AS (
    SELECT unnest($4::text[]) AS host
    UNION
    SELECT coalesce(busy.host, taken.host)
    FROM busy FULL JOIN taken ON taken.host = busy.host
    WHERE coalesce(busy.count, 0) + coalesce(taken.count, 0) >= $7
), due AS (
    -- This statement sees the rows as they were before it: the deliveries it leased or
    -- recorded are looked at as its own changes leave them.
    SELECT min(pending.at) AS next_due
    FROM (SELECT host, greatest(next_attempt_at, locked_until) AS at
          FROM webhook_deliveries
          WHERE status = 'pending' AND id NOT IN (SELECT delivery_id FROM attempt)
            AND id NOT IN (SELECT id FROM leased)
          UNION ALL
          SELECT host, next_attempt_at FROM recorded WHERE status = 'pending') AS pending
    WHERE pending.host NOT IN (SELECT host FROM full_hosts)
      AND (SELECT count(*) FROM leased) < $3
)
SELECT leased.*, due.next_due, (SELECT array_agg(id) FROM recorded) AS kept
FROM due LEFT JOIN leased ON true

-- name: release
-- Give up the leases $2 (tokens, an element per delivery) of the deliveries $1, those still
-- held: attempts cut short by a shutdown, sent again at once by whichever worker comes next.
UPDATE webhook_deliveries AS d SET locked_until = NULL, lease_token = NULL
FROM unnest($1::uuid[], $2::uuid[]) AS released (id, lease_token)
WHERE d.id = released.id AND d.lease_token = released.lease_token
