-- The API's reads on every request for one job (jobs/repository.py): a status poll is the
-- most frequent request a gateway answers, so it is one prepared statement, one round trip,
-- with no statement built or ORM object loaded per poll.

-- name: job
-- The job with id $1, if any.
SELECT * FROM jobs WHERE id = $1

-- name: job_shown
-- The job with id $1 as a Comfy API v2 poll shows it, if any: every column but its prompt,
-- which no poll shows and which is tens of KB of JSON to send and decode (0.8 ms of a poll's
-- CPU at 52 KB), and in its place the prompt's node ids, each mapped to null: what a poll
-- counts of it (its progress, nodes done of all).
SELECT id, client_task_id, workflow, params,
    coalesce((SELECT jsonb_object_agg(node, NULL) FROM jsonb_object_keys(prompt) AS node),
             '{}') AS prompt,
    status, progress, progress_detail, priority, callback_url, backend, prompt_id, attempts,
    created_at, dispatched_at, dispatched_by, started_at, uploading_at, finished_at, outputs,
    error, webhook_events, api_key_hash, fingerprint, reused_from, source, labels, warnings,
    webhook_format, overtaken, extra_data_holder
FROM jobs WHERE id = $1

-- name: job_changes
-- The columns of the job $1 that its changes touch (those jobs.sql's changes return), if it
-- exists: what a job's event stream reads again on each change, the rest (its prompt, tens of
-- KB of JSON to decode) held from its first read.
SELECT status, progress, progress_detail, backend, prompt_id, attempts, dispatched_at,
    dispatched_by, started_at, uploading_at, finished_at, outputs, error
FROM jobs WHERE id = $1

-- name: mean_run_seconds
-- The mean start-to-finish seconds of the latest $3 successful runs of workflow $1 on backend
-- $2, or on any backend when $2 is null or ran none of them; null when none ran. Each mean
-- walks an index of the runs it averages, newest first (jobs_run_times_by_backend, migration
-- 0042; jobs_run_times, 0004), and the second is read only when the first finds none: as one
-- walk of jobs_run_times filtered by backend, the mean of a backend that ran none (null, or
-- one new to the workflow) read every run of the workflow ever stored, 0.2 s at 400,000.
SELECT coalesce(
    (SELECT avg(extract(epoch FROM finished_at) - extract(epoch FROM started_at))
     FROM (SELECT started_at, finished_at FROM jobs
           WHERE workflow = $1 AND backend = $2 AND status = 'succeeded'
             AND started_at IS NOT NULL
           ORDER BY finished_at DESC LIMIT $3) AS runs),
    (SELECT avg(extract(epoch FROM finished_at) - extract(epoch FROM started_at))
     FROM (SELECT started_at, finished_at FROM jobs
           WHERE workflow = $1 AND status = 'succeeded' AND started_at IS NOT NULL
           ORDER BY finished_at DESC LIMIT $3) AS runs)) AS mean

-- name: left_on_backends
-- The expected seconds the jobs on backends (dispatched, running or uploading) have left:
-- those of the API key whose digest is $2 (null: of no key) when $1, those sent to backend $4
-- before $5 when $3, else all of them. Each has its workflow's learned run time (the mean of
-- its latest $6 successful runs, fleet-wide) less what it has run already; a job of a
-- workflow never seen to end (a cold start) as long again as it has run so far, a guess that
-- grows as the wait does. `total`: all told (0 without any), the work every queued job waits
-- behind; `soonest`: the least (null without any), when a slot is next freed.
SELECT coalesce(sum(left_on.seconds), 0.0) AS total, min(left_on.seconds) AS soonest
FROM (
    SELECT CASE WHEN learned.seconds IS NULL THEN ran.seconds
                ELSE greatest(learned.seconds - ran.seconds, 0) END AS seconds
    FROM jobs AS active
    CROSS JOIN LATERAL (
        SELECT extract(epoch FROM now() - coalesce(active.started_at, now())) AS seconds
    ) AS ran
    CROSS JOIN LATERAL (
        SELECT avg(extract(epoch FROM finished_at) - extract(epoch FROM started_at)) AS seconds
        FROM (SELECT started_at, finished_at FROM jobs
              WHERE workflow = active.workflow AND status = 'succeeded'
                AND started_at IS NOT NULL
              ORDER BY finished_at DESC LIMIT $6) AS runs
    ) AS learned
    WHERE active.status IN ('dispatched', 'running', 'uploading')
      AND (NOT $1 OR active.api_key_hash IS NOT DISTINCT FROM $2)
      AND (NOT $3 OR (active.backend = $4 AND active.dispatched_at < $5))
) AS left_on
