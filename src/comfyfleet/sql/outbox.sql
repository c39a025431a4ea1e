-- The webhook outbox's hot path (webhooks/outbox.py): one statement, so one round trip with
-- no BEGIN or COMMIT around it, records the attempts a worker made since its last one, leases
-- the deliveries due now and finds when the next one falls due.

-- name: pass
-- Record the attempts $2..$10 (arrays, an element per attempt): of delivery $2, leased under
-- token $3, attempted at $4, answered $5 (status code) in $6 ms, $7 error, $8 response
-- snippet; the delivery's next status $9 and, if pending, when it is due again, $10. Each is
-- logged; the delivery moves on only where its lease held (else another worker owns it now).
-- Then lease up to $11 deliveries due at $1 (a lease that ran out counting as due), skipping
-- the hosts $12 and taking per receiver host only as many as $15 minus those the caller has
-- in flight there ($13 hosts, $14 their counts); the lease runs to $16 under token $17. The
-- candidates are locked SKIP LOCKED, so processes claiming side by side never share one.
-- A row per delivery leased (none: one row of nulls), each with `kept`, the recorded
-- deliveries whose lease held, and `next_due`: when the earliest delivery still pending, not
-- for a host now full, can next be claimed (null if none, or when the lease took all $11).
WITH attempt AS (
    SELECT * FROM unnest($2::uuid[], $3::uuid[], $4::timestamptz[], $5::int[], $6::int[],
                         $7::text[], $8::text[], $9::text[], $10::timestamptz[])
        AS attempt (delivery_id, lease_token, attempted_at, status_code, latency_ms, error,
                    response_snippet, status, next_attempt_at)
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
    SELECT * FROM unnest($13::text[], $14::int[]) AS busy (host, count)
), candidates AS (
    -- Not a delivery recorded above: one statement changes a row once.
    SELECT id, host, next_attempt_at
    FROM webhook_deliveries
    WHERE status = 'pending'
      AND next_attempt_at <= $1
      AND (locked_until IS NULL OR locked_until <= $1)
      AND host <> ALL($12::text[])
      AND id <> ALL($2::uuid[])
    ORDER BY next_attempt_at
    LIMIT $11
    FOR UPDATE SKIP LOCKED
), ranked AS (
    SELECT id, host, row_number() OVER (PARTITION BY host ORDER BY next_attempt_at) AS place
    FROM candidates
), leased AS (
    UPDATE webhook_deliveries AS d
    SET locked_until = $16, lease_token = $17
    FROM ranked LEFT JOIN busy ON busy.host = ranked.host
    WHERE d.id = ranked.id AND coalesce(busy.count, 0) + ranked.place <= $15
    RETURNING d.*
), taken AS (
    SELECT host, count(*) AS count FROM leased GROUP BY host
), full_hosts AS (
    SELECT unnest($12::text[]) AS host
    UNION
    SELECT coalesce(busy.host, taken.host)
    FROM busy FULL JOIN taken ON taken.host = busy.host
    WHERE coalesce(busy.count, 0) + coalesce(taken.count, 0) >= $15
), due AS (
    -- This statement sees the rows as they were before it: the deliveries it leased or
    -- recorded are looked at as its own changes leave them.
    SELECT min(pending.at) AS next_due
    FROM (SELECT host, greatest(next_attempt_at, locked_until) AS at
          FROM webhook_deliveries
          WHERE status = 'pending' AND id <> ALL($2::uuid[])
            AND id NOT IN (SELECT id FROM leased)
          UNION ALL
          SELECT host, next_attempt_at FROM recorded WHERE status = 'pending') AS pending
    WHERE pending.host NOT IN (SELECT host FROM full_hosts)
      AND (SELECT count(*) FROM leased) < $11
)
SELECT due.next_due, (SELECT array_agg(id) FROM recorded) AS kept, leased.*
FROM due LEFT JOIN leased ON true

-- name: release
-- Give up the leases $2 (tokens, an element per delivery) of the deliveries $1, those still
-- held: attempts cut short by a shutdown, sent again at once by whichever worker comes next.
UPDATE webhook_deliveries AS d SET locked_until = NULL, lease_token = NULL
FROM unnest($1::uuid[], $2::uuid[]) AS released (id, lease_token)
WHERE d.id = released.id AND d.lease_token = released.lease_token
