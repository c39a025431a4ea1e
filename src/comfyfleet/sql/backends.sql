-- The fleet's table (fleet/registry.py): the backends every process shares and their drain
-- state. Each change commits a statement-level trigger's NOTIFY to every process (migration
-- 0025). The changes that check names and URLs run after `lock_fleet`, in its transaction,
-- so that two processes cannot both find a name or URL free and both take it; a removal runs
-- after the backend's own lock (jobs.sql `lock`, as the claims take it) instead.

-- name: lock_fleet
-- Serialise the changes that check names and URLs, in every process, until the transaction
-- ends; readers go on.
LOCK TABLE backends IN SHARE ROW EXCLUSIVE MODE

-- name: all
-- Every backend, by name.
SELECT name, url, draining, discovered_by, vanished FROM backends ORDER BY name

-- name: seed
-- Make sure the backends named $1 are there at the URLs $2 (arrays, an element per
-- backend), a backend there already keeping its drain state, unless another name has one
-- of those URLs: then nothing is written, and those backends (name, url) come back.
WITH wanted AS (
    SELECT * FROM unnest($1::text[], $2::text[]) AS wanted (name, url)
), clash AS (
    SELECT backends.name, backends.url
    FROM backends JOIN wanted ON backends.url = wanted.url AND backends.name <> wanted.name
), seeded AS (
    INSERT INTO backends (name, url)
    SELECT name, url FROM wanted WHERE NOT EXISTS (SELECT FROM clash)
    ON CONFLICT (name) DO UPDATE SET url = EXCLUDED.url
)
SELECT name, url FROM clash

-- name: add
-- Add backend $1 at URL $2, found by the discovery $3 (null: configured or added through the
-- API), unless a backend of that name or at that URL is there: then nothing is written, and
-- those (name, url) come back, the one of that name first.
WITH clash AS (
    SELECT name, url FROM backends WHERE name = $1 OR url = $2
), added AS (
    INSERT INTO backends (name, url, discovered_by)
    SELECT $1, $2, $3 WHERE NOT EXISTS (SELECT FROM clash)
)
SELECT name, url FROM clash ORDER BY name = $1 DESC

-- name: set_draining
-- Drain backend $1 ($2 true) or let it take work again ($2 false); $3: drained because its
-- address left DNS (`vanished`, only while drained).
UPDATE backends SET draining = $2, vanished = $2 AND $3 WHERE name = $1

-- name: remove
-- Remove backend $1 if it is drained and no job is on it (dispatched, running or uploading,
-- from any process); run under the backend's lock, which the claims take, so that it counts
-- every job claimed before. `on_it`: the jobs on it; `removed`: whether it was removed.
WITH on_it AS (
    SELECT count(*) AS jobs FROM jobs
    WHERE backend = $1 AND status IN ('dispatched', 'running', 'uploading')
), removed AS (
    DELETE FROM backends WHERE name = $1 AND draining AND (SELECT jobs FROM on_it) = 0
    RETURNING name
)
SELECT (SELECT jobs FROM on_it) AS on_it, EXISTS (SELECT FROM removed) AS removed
