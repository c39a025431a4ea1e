-- A job's life outside the claim (jobs/repository.py): store it, then move it along as its
-- backend reports. Each is one statement, so one round trip with no BEGIN or COMMIT around
-- it; where a webhook reports the change, the job and its outbox row are written by that
-- one statement, so neither is ever written without the other (DESIGN §5): the statement
-- calls enqueue_webhook (migration 0019) LATERAL on the row it wrote, which writes the outbox
-- row, if any, and notifies `comfyfleet_webhooks` (webhooks/worker.py listens) on commit.
--
-- Every change is fenced on the job as the caller knows it: $1 its id, $2 its attempts, $3
-- its prompt id, and the states it may be in. A stale actor (an older attempt, another
-- process, the holder of a prompt moved elsewhere) changes nothing and gets no row back.
-- What comes back are the columns a change may touch (and the id, where the outbox row is
-- written from the row); the caller has the others. A JSON document the caller wrote comes
-- back null (it has it): the connection decodes every jsonb value a row holds, in Python.
--
-- Rows travel as JSON objects, a column by name (jsonb_populate_record), so a column added
-- to the models is written without touching this file.

-- name: insert
-- Store the job $1 unless its client_task_id is taken (by a job of the same API key and
-- source: a key is one caller's and one API's); with $2, a webhook_deliveries row, that
-- delivery too (a job stored already ended). When the job is stored, the claim of holder $6
-- on the idempotency key $5 of $3 among the keys of $4 (`claim_key`; nulls: none) goes with
-- the same statement: from its commit a retry finds the job. Returns the job's id and, when
-- $7 is true, whether it is first in line (`alone`: no other job was queued; its queue position
-- is 1, known without counting), no row when the client_task_id was taken (nothing is written
-- then, the claim is kept). (Any queued is asked in jobs_queued_by_tenant's order: see
-- claim.sql's head.)
WITH stored AS (
    INSERT INTO jobs
    SELECT * FROM jsonb_populate_record(NULL::jobs, $1::jsonb)
    ON CONFLICT ((coalesce(api_key_hash, '')), source, client_task_id)
        WHERE client_task_id IS NOT NULL DO NOTHING
    RETURNING id
), released AS (
    DELETE FROM idempotency_claims
    WHERE tenant = $3::text AND scope = $4::text AND key = $5::text AND token = $6::text
      AND EXISTS (SELECT FROM stored)
)
SELECT stored.id,
       $7::boolean AND (SELECT true FROM jobs WHERE status = 'queued'
                        ORDER BY coalesce(api_key_hash, '') LIMIT 1) IS NULL AS alone
FROM stored CROSS JOIN LATERAL enqueue_webhook(stored.id, $2::jsonb)

-- name: transition
-- Move the job on from one of the states $4: each of $5 status, $6 progress, $9 started_at,
-- $14 uploading_at, $10 finished_at, $11 outputs, $12 error that is not null is written, and when $7 is true
-- the progress detail $8 (null or not). With $13, a webhook_deliveries row, the delivery is
-- written too when the job is. Outputs, error and progress detail written come back null.
WITH changed AS (
    UPDATE jobs
    SET status = coalesce($5, status), progress = coalesce($6, progress),
        progress_detail = CASE WHEN $7::boolean THEN $8::jsonb ELSE progress_detail END,
        started_at = coalesce($9, started_at), uploading_at = coalesce($14, uploading_at),
        finished_at = coalesce($10, finished_at),
        outputs = coalesce($11::jsonb, outputs), error = coalesce($12::jsonb, error)
    WHERE id = $1 AND attempts = $2 AND prompt_id IS NOT DISTINCT FROM $3
      AND status = ANY($4::text[])
    RETURNING id, status, progress,
        CASE WHEN NOT $7::boolean THEN progress_detail END AS progress_detail, backend,
        prompt_id, attempts, dispatched_at, dispatched_by, started_at, uploading_at,
        finished_at, CASE WHEN $11::jsonb IS NULL THEN outputs END AS outputs,
        CASE WHEN $12::jsonb IS NULL THEN error END AS error
)
SELECT changed.* FROM changed CROSS JOIN LATERAL enqueue_webhook(changed.id, $13::jsonb)

-- name: finish
-- End jobs, an element of each array per job: $1 its id, $2 its attempts, $3 its prompt id and
-- $4 the states it may be in, comma-separated (the fence, as in `transition`: a job fenced out
-- is left as it is, the others end all the same), $5 its status, $6 its finished_at, each of $7
-- outputs, $8 error, $9 started_at, $10 uploading_at, $11 progress that is not null, when $12
-- is true its progress detail $13 (null or not), and $14, a webhook_deliveries row (null:
-- none), the delivery written with the job. One statement for the ends that came while the one
-- before was in flight (jobs/repository.py `finish`); one job's alone when it came alone.
-- Returns each job ended, as `transition` does, with `entry`: its place among the arrays
-- (from 1), its outputs, error and progress detail null where the arrays gave them. The same
-- job twice is ended once, by either.
-- A job leaving its backend's slot settles its tenant's charge (the trigger
-- jobs_settle_tenant_charge, migration 0017), which locks the tenant's share as the job is
-- written, in whatever order the update writes the jobs. So the jobs are locked first, in the
-- order of their ids, then the shares the statement settles, if more than one, in the order of
-- the tenants (lock_tenant_shares(), migration 0036), before any job is written: no two of
-- these statements (two processes') wait for each other in a cycle, nor one of them and a
-- statement that takes a job off its GPU alone (which locks the job, then its share).
WITH ending AS (
    SELECT ending.* FROM (
        -- The arrays as a subquery's columns (OFFSET 0: kept a subquery), not as the call's
        -- values: a plan made with those values knows how many ends there are and costs less
        -- than one made without (10 a guess) whenever fewer come, so PostgreSQL would plan
        -- the statement afresh at every call (0.24 ms of its CPU a job). Both now guess, and
        -- the plan made once per connection is kept.
        SELECT $1::uuid[], $2::int[], $3::text[], $4::text[], $5::text[], $6::timestamptz[],
               $7::jsonb[], $8::jsonb[], $9::timestamptz[], $10::timestamptz[], $11::float8[],
               $12::boolean[], $13::jsonb[], $14::jsonb[]
        OFFSET 0
    ) AS given (ids, attempts, prompt_ids, states, statuses, finished_ats, outputs, errors,
                started_ats, uploading_ats, progresses, details_given, details, deliveries)
    CROSS JOIN LATERAL unnest(ids, attempts, prompt_ids, states, statuses, finished_ats,
                              outputs, errors, started_ats, uploading_ats, progresses,
                              details_given, details, deliveries) WITH ORDINALITY
        AS ending (id, attempts, prompt_id, states, status, finished_at, outputs, error,
                   started_at, uploading_at, progress, detail_given, detail, delivery, entry)
), locked AS MATERIALIZED (
    -- An aggregate over every job locked: all of them are, before any share is. The tenants
    -- whose shares the trigger settles: of the jobs on a GPU with a charge (its condition).
    SELECT array_agg(DISTINCT tenant) FILTER (WHERE settles) AS tenants
    FROM (SELECT coalesce(jobs.api_key_hash, '') AS tenant,
                 jobs.status IN ('dispatched', 'running') AND jobs.charged_seconds IS NOT NULL
                     AS settles
          FROM ending JOIN jobs ON jobs.id = ending.id AND jobs.attempts = ending.attempts
              AND jobs.prompt_id IS NOT DISTINCT FROM ending.prompt_id
              AND jobs.status = ANY(string_to_array(ending.states, ','))
          ORDER BY jobs.id
          FOR NO KEY UPDATE OF jobs) AS ended
), settling AS MATERIALIZED (
    -- One row, once the shares are locked: no job is written before.
    SELECT lock_tenant_shares(tenants) FROM locked
), changed AS (
    UPDATE jobs
    SET status = ending.status, finished_at = ending.finished_at,
        outputs = coalesce(ending.outputs, jobs.outputs),
        error = coalesce(ending.error, jobs.error),
        started_at = coalesce(ending.started_at, jobs.started_at),
        uploading_at = coalesce(ending.uploading_at, jobs.uploading_at),
        progress = coalesce(ending.progress, jobs.progress),
        progress_detail = CASE WHEN ending.detail_given THEN ending.detail
                               ELSE jobs.progress_detail END
    FROM ending CROSS JOIN settling
    WHERE jobs.id = ending.id AND jobs.attempts = ending.attempts
      AND jobs.prompt_id IS NOT DISTINCT FROM ending.prompt_id
      AND jobs.status = ANY(string_to_array(ending.states, ','))
    RETURNING jobs.id, jobs.status, jobs.progress,
        CASE WHEN NOT ending.detail_given THEN jobs.progress_detail END AS progress_detail,
        jobs.backend, jobs.prompt_id, jobs.attempts, jobs.dispatched_at, jobs.dispatched_by,
        jobs.started_at, jobs.uploading_at, jobs.finished_at,
        CASE WHEN ending.outputs IS NULL THEN jobs.outputs END AS outputs,
        CASE WHEN ending.error IS NULL THEN jobs.error END AS error, ending.delivery,
        ending.entry
)
SELECT changed.id, status, progress, progress_detail, backend, prompt_id, attempts,
    dispatched_at, dispatched_by, started_at, uploading_at, finished_at, outputs, error, entry
FROM changed CROSS JOIN LATERAL enqueue_webhook(changed.id, changed.delivery)

-- name: progress
-- Record how far the running jobs have come, an element of each array per job: $1 its id,
-- $2 its attempts, $3 its prompt id (the fence, as in `transition`: a job not running that
-- attempt of that prompt is left as it is), $4 its progress, $5 its progress detail (null or
-- not) and $6, a webhook_deliveries row (null: none), the delivery written with the job. One
-- statement for every running job's latest report, however many run. Returns each job written
-- (its progress detail null: the caller's).
WITH reported AS (
    SELECT * FROM unnest($1::uuid[], $2::int[], $3::text[], $4::float8[], $5::jsonb[],
                         $6::jsonb[])
        AS reported (id, attempts, prompt_id, progress, detail, delivery)
), changed AS (
    UPDATE jobs
    SET progress = reported.progress, progress_detail = reported.detail
    FROM reported
    WHERE jobs.id = reported.id AND jobs.attempts = reported.attempts
      AND jobs.prompt_id IS NOT DISTINCT FROM reported.prompt_id AND jobs.status = 'running'
    RETURNING jobs.id, jobs.status, jobs.progress, jobs.backend, jobs.prompt_id, jobs.attempts,
        jobs.dispatched_at, jobs.dispatched_by, jobs.started_at, jobs.uploading_at,
        jobs.finished_at, jobs.outputs, jobs.error, reported.delivery
)
SELECT changed.id, status, progress, NULL::jsonb AS progress_detail, backend, prompt_id,
    attempts, dispatched_at, dispatched_by, started_at, uploading_at, finished_at, outputs,
    error
FROM changed CROSS JOIN LATERAL enqueue_webhook(changed.id, changed.delivery)

-- name: requeue
-- Put the job, whose prompt was lost, back in the backlog with the error $4 (or none); it
-- keeps its attempt count, and sheds the outputs stored while the lost prompt ran (the next
-- run's come instead).
UPDATE jobs
SET status = 'queued', backend = NULL, prompt_id = NULL, progress = 0, progress_detail = NULL,
    outputs = '[]', error = $4::jsonb
WHERE id = $1 AND attempts = $2 AND prompt_id IS NOT DISTINCT FROM $3
  AND status IN ('dispatched', 'running', 'uploading')
RETURNING status, progress, progress_detail, backend, prompt_id, attempts, dispatched_at,
    dispatched_by, started_at, uploading_at, finished_at, outputs, error

-- name: release
-- Undo the claim of the job, whose prompt never reached its backend: queued again, the
-- attempt not spent.
UPDATE jobs
SET status = 'queued', backend = NULL, prompt_id = NULL, attempts = attempts - 1,
    dispatched_at = NULL
WHERE id = $1 AND attempts = $2 AND prompt_id IS NOT DISTINCT FROM $3
  AND status = 'dispatched'
RETURNING status, progress, progress_detail, backend, prompt_id, attempts, dispatched_at,
    dispatched_by, started_at, uploading_at, finished_at, outputs, error

-- name: move
-- Give the job, whose prompt is off its backend now (never started, or interrupted to run
-- afresh elsewhere), to backend $4 as prompt $5 (followed by process $6), if that backend
-- takes work and has fewer than $7 prompts on it; no attempt is spent. One statement, its own
-- transaction, under the backend's lock as a claim's take (claim.sql `claim`): claim_locks()
-- takes it and counts after it (migration 0031), so the count sees every take and move
-- committed before; the job's row is locked only after it (joined to `guarded`).
WITH guarded AS MATERIALIZED (
    SELECT * FROM claim_locks($4, NULL, '{}')
)
UPDATE jobs
SET status = 'dispatched', backend = $4, prompt_id = $5, dispatched_by = $6,
    dispatched_at = statement_timestamp(), started_at = NULL, progress = 0, progress_detail = NULL,
    outputs = '[]'
FROM guarded
WHERE id = $1 AND attempts = $2 AND prompt_id IS NOT DISTINCT FROM $3
  AND status IN ('dispatched', 'running')
  AND guarded.accepting AND guarded.on_gpu < $7
RETURNING status, progress, progress_detail, backend, prompt_id, attempts, dispatched_at,
    dispatched_by, started_at, uploading_at, finished_at, outputs, error

-- name: take_over
-- Make process $4 the one following the job on its backend, unless another process took it
-- over first (it is followed by $5 no longer, null: by none).
UPDATE jobs
SET dispatched_by = $4
WHERE id = $1 AND attempts = $2 AND prompt_id IS NOT DISTINCT FROM $3
  AND dispatched_by IS NOT DISTINCT FROM $5
  AND status IN ('dispatched', 'running', 'uploading')
RETURNING status, progress, progress_detail, backend, prompt_id, attempts, dispatched_at,
    dispatched_by, started_at, uploading_at, finished_at, outputs, error

-- name: on_backend
-- The jobs on backend $1: dispatched, running or uploading. (The states are written out, so
-- that the plan PostgreSQL keeps for any $1 walks the partial index jobs_on_backend.)
SELECT * FROM jobs
WHERE backend = $1 AND status IN ('dispatched', 'running', 'uploading')

-- name: unfollowed
-- The jobs on any backend followed by none of the processes $1 (the live ones), nor by any
-- process at all: what a process that stopped left behind. (As in `on_backend`, the states
-- are written out for the partial index.)
SELECT * FROM jobs
WHERE status IN ('dispatched', 'running', 'uploading')
  AND (dispatched_by IS NULL OR dispatched_by <> ALL($1::int[]))

-- name: extra_data_lost
-- The queued jobs whose extra_data a process not among $1 (the live ones) held: nobody can
-- send them now (jobs/extra_data.py). (The condition is written out for the partial index
-- jobs_queued_extra_data.)
SELECT * FROM jobs
WHERE status = 'queued' AND extra_data_holder IS NOT NULL
  AND extra_data_holder <> ALL($1::int[])

-- name: ended_among
-- Of the jobs $1, those that have ended.
SELECT id FROM jobs
WHERE id = ANY($1::uuid[]) AND status IN ('succeeded', 'failed', 'cancelled')

-- name: by_client_task_id
-- The job stored under client_task_id $1 by the API key whose digest is $2 (null: without
-- a key) with source $3, if any.
SELECT * FROM jobs
WHERE client_task_id = $1 AND coalesce(api_key_hash, '') = coalesce($2, '') AND source = $3

-- name: claim_key
-- Claim the idempotency key $3 of the API key whose digest is $1 ('' without keys) among
-- the keys of $2 for the holder $4, for $5 seconds, unless another's claim on it still
-- holds; a row when claimed.
INSERT INTO idempotency_claims (tenant, scope, key, token, held_until)
VALUES ($1, $2, $3, $4, now() + make_interval(secs => $5))
ON CONFLICT (tenant, scope, key) DO UPDATE
SET token = EXCLUDED.token, held_until = EXCLUDED.held_until
WHERE idempotency_claims.held_until < now()
RETURNING true

-- name: release_key
-- Let go of the claim on key $3 of $1 among the keys of $2, when the holder $4 still has it.
DELETE FROM idempotency_claims WHERE tenant = $1 AND scope = $2 AND key = $3 AND token = $4

-- name: lock
-- Hold the advisory lock named $1 until the transaction ends.
SELECT pg_advisory_xact_lock(hashtext($1))

-- name: queued
-- How many jobs are queued: all of them when $1 is false, else those of the API key whose
-- digest is $2 (null: those submitted without a key). Two cases, each finding the key's by
-- jobs_unfinished_by_key_status in a generic plan (as claim_locks(), migration 0038): one
-- comparison of the key whether or not it is null, IS NOT DISTINCT FROM, is no index's, and
-- walked every queued job.
SELECT CASE WHEN NOT $1::boolean THEN (SELECT count(*) FROM jobs WHERE status = 'queued')
            WHEN $2::text IS NULL THEN
                (SELECT count(*) FROM jobs WHERE api_key_hash IS NULL AND status = 'queued')
            ELSE (SELECT count(*) FROM jobs WHERE api_key_hash = $2 AND status = 'queued') END
