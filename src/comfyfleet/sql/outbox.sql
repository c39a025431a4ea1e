-- The webhook outbox's hot path (webhooks/outbox.py): lease due deliveries, record an
-- attempt, find when the next one falls due. Each is one statement, so one round trip with
-- no BEGIN or COMMIT around it.

-- name: claim
-- Lease up to $2 due deliveries (due at $1, a lease that ran out counting as due), skipping
-- the hosts $3 and taking per receiver host only as many as $6 minus the deliveries the
-- caller already has there ($4 hosts, $5 their counts). The lease runs to $7 under token $8.
-- The candidates are locked SKIP LOCKED, so processes claiming side by side never share one.
WITH candidates AS (
    SELECT id, host, next_attempt_at
    FROM webhook_deliveries
    WHERE status = 'pending'
      AND next_attempt_at <= $1
      AND (locked_until IS NULL OR locked_until <= $1)
      AND host <> ALL($3::text[])
    ORDER BY next_attempt_at
    LIMIT $2
    FOR UPDATE SKIP LOCKED
), ranked AS (
    SELECT id, host, row_number() OVER (PARTITION BY host ORDER BY next_attempt_at) AS place
    FROM candidates
)
UPDATE webhook_deliveries AS d
SET locked_until = $7, lease_token = $8
FROM ranked LEFT JOIN unnest($4::text[], $5::int[]) AS busy (host, count)
    ON busy.host = ranked.host
WHERE d.id = ranked.id AND coalesce(busy.count, 0) + ranked.place <= $6
RETURNING d.*

-- name: record
-- Log an attempt of delivery $1 and move the delivery on, unless its lease (token $2) was
-- lost meanwhile: then only the log entry is written (another worker owns the delivery now).
-- The attempt: $3 attempted at, $4 status code, $5 latency (ms), $6 error, $7 response
-- snippet; the delivery's next status $8 and, if pending, when it is due again, $9.
-- Returns the delivery's id when the lease held.
WITH logged AS (
    INSERT INTO webhook_attempts
        (delivery_id, attempted_at, status_code, latency_ms, error, response_snippet)
    VALUES ($1, $3, $4, $5, $6, $7)
)
UPDATE webhook_deliveries
SET status = $8, next_attempt_at = $9, attempts = attempts + 1, locked_until = NULL,
    lease_token = NULL, last_status_code = $4, last_error = $6
WHERE id = $1 AND lease_token = $2
RETURNING id

-- name: next_due
-- When the earliest pending delivery not for the hosts $1 can next be claimed; null if none.
SELECT min(greatest(next_attempt_at, locked_until))
FROM webhook_deliveries
WHERE status = 'pending' AND host <> ALL($1::text[])
