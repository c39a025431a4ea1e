-- A gateway process's lease (jobs/lease.py): a session-level advisory lock with the two keys
-- $1 (the space, "comf") and $2 (the process's id), held as long as its connection lives.

-- name: hold
-- Take the lease of process $2 in space $1, for as long as this connection lives.
SELECT pg_advisory_lock($1, $2)

-- name: beat
-- Whether the held connection still answers.
SELECT 1

-- name: live
-- The ids of the processes holding their lease in space $1 now.
SELECT objid::int8 AS id FROM pg_locks
WHERE locktype = 'advisory' AND classid = $1 AND objsubid = 2 AND granted
