-- The API's reads on every request for one job (jobs/repository.py): a status poll is the
-- most frequent request a gateway answers, so it is one prepared statement, one round trip,
-- with no statement built or ORM object loaded per poll.

-- name: job
-- The job with id $1, if any.
SELECT * FROM jobs WHERE id = $1

-- name: job_changes
-- The columns of the job $1 that its changes touch (those jobs.sql's changes return), if it
-- exists: what a job's event stream reads again on each change, the rest (its prompt, tens of
-- KB of JSON to decode) held from its first read.
SELECT status, progress, progress_detail, backend, prompt_id, attempts, dispatched_at,
    dispatched_by, started_at, uploading_at, finished_at, outputs, error
FROM jobs WHERE id = $1
