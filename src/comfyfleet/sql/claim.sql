-- The dispatcher's claim (jobs/repository.py `claim_next`): one statement, `claim`, on its own
-- (no BEGIN, no COMMIT, a round trip). It takes the job a backend chose from the backlog the
-- caller read (`take`, below) and reads the backlog for the next claim as that take leaves it
-- (`read`), so that a dispatcher claiming jobs in a row makes one round trip a job; with no job
-- to take, it only reads, taking no lock (the first claim of a pass, whose caller holds no read).
-- The read is of the free slots of a backend and the head of each tenant's backlog; the
-- dispatcher asks its backends in turn on it, and the first that chooses a job has it taken: the
-- take takes that backend's lock (and the tenant's, if it has a limit), counts again under them,
-- and takes the job, charging its tenant, or refuses. Nothing is held between two claims, so no
-- claim ever waits for a lock while it holds one. Tenants are API keys by digest, '' for the jobs
-- of no key; each has a virtual time in `tenant_shares` (GPU-seconds charged over its weight),
-- and a tenant new or back from idling starts at the fleet's virtual clock (the latest start any
-- claim gave), never below it: no burst for having been away. The charge made here is settled
-- against the real run by the trigger jobs_settle_tenant_charge (migration 0017) in whatever
-- statement takes the job off its backend. The only other SQL of the claim is claim_locks()
-- (migration 0031): the take's locks and the counts made after them, a tenant's by
-- jobs_on_backends() (migration 0040), as the read counts it.
-- The reads here that stop at the first queued jobs found (LIMIT, any queued?) ask for them in
-- the order of jobs_queued_by_tenant (by tenant first), which no other index or plan gives
-- without reading every queued job: in no order the planner may read the heap from its start,
-- taking the queued jobs for spread over it, when a burst queued after a day of ended jobs
-- sits at its end (every claim read the whole heap). jobs.sql `insert` and `queued` as well.

-- name: claim
-- Take: dispatch queued job $1 (null: take nothing, only read) to backend $3 as prompt $4
-- (followed by process $5), unless its tenant has as many jobs on backends as its max_concurrent
-- ($7 for keys without their own) by now, or has one and $10 does not name it ($10: the tenant
-- whose lock to take, a key's digest or '' for no key; null: none, the read having seen no limit
-- for it: the limit was set since, and without the lock the count could miss another claim's),
-- or the backend takes no work or has $8 prompts on it, the prompts $9 not counted (as in the
-- read); count the jobs it passes as overtaken once more; charge its tenant $6 estimated
-- GPU-seconds over its weight, starting no earlier than the virtual clock. The jobs it passes are
-- those $2 the caller chose to pass, and every job queued ahead of it in its tenant's backlog at
-- its priority (as the read orders and filters them for process $5) but those $12, the queued
-- jobs the caller's read saw: a job seen and not passed is one the backend cannot run, and one not
-- seen came back to the backlog since (requeued, with its old created_at), which the caller never
-- judged, and which would otherwise be passed uncounted.
-- It takes the backend's lock first, then the tenant's, and holds them until it ends: the takes
-- for a backend, in every process, follow one another, each counting what those before it took.
-- The counts are made by claim_locks() (migration 0031) after its locks: this statement's own
-- reads began before it waited for them, and would miss a take committed meanwhile (a function's
-- statements each begin afresh). Then the job and those it passes are locked, in the order of
-- their ids (takes side by side lock the jobs they share in one order, and take every advisory
-- lock before any row's, so none waits for another in a cycle), and judged at their latest
-- versions, which may be newer than the caller's read: if another claim took the job since, or
-- one of those it passes is still queued and already passed $11 times (null: no bound) by another
-- claim, nothing is taken (raced: the caller picks again, on this statement's read).
-- Read: with no job to take, the free slots of backend $3 (at most $8 prompts; none while it is
-- draining or gone), the prompts $9 (the caller's whose end it has read from the backend, their
-- jobs not recorded off it yet) holding no slot: a prompt that ended holds no GPU, and the claim
-- need not wait for the statement recording that end (other processes, which have not read it,
-- count it until it is); after a take, or a refusal, null: the take counts them. Then how many jobs
-- are queued, locked by other claims or not (`backlog`: 0, 1, or 2 for more) and, with a slot
-- free or after a take, the head of each tenant's backlog: the $13 tenants with queued work
-- that come first in virtual time, and of each its first ceil($13 / tenants) jobs (highest
-- priority, then oldest), skipping the tenants with as many jobs on backends as their
-- max_concurrent ($7 for keys without their own; null: no limit). The jobs come in the order
-- of the tenants' starts, then each tenant's own, as arrays in that order: `ids` (a uuid[]
-- literal, which the caller sends back as $12 or $14), `overtaken_counts`, and `places`: of a
-- job the caller holds (one of those $12, its read's, or $14), its place in that list (1 for the
-- first), and 0 for the others, which come whole in `fresh`, in order, each a `claim_job`
-- (migration 0048: a named type decodes in half the client's CPU of a record), its prompt as
-- text. A job's prompt, workflow, priority, created_at and tenant never change once it is
-- stored, and a tenant's head is read again by every claim: the caller's copy serves, and a job
-- new to it is the one after each take at saturation (a take names the jobs of its read once,
-- and no other).
-- And `tenants`, a `claim_tenant` each in the same order: its start in virtual time and weight,
-- and whether it has a max_concurrent (`limited`: the take locks it); and whether any tenant's
-- backlog goes on past the jobs read (`beyond`: its last read is its ceil($13 / tenants)th;
-- migration 0049). The tenant's values move with every charge: once a tenant, they leave the
-- jobs as the caller holds them, but for their overtaken counts. The read is as this
-- statement's take leaves the backlog: its job gone from it and on a backend, those it passed
-- passed once more, its tenant charged, and the jobs it locked as it found them. The jobs are
-- read without locks: claims for other backends, in this process or another, read the same head
-- side by side, none hidden from another (a job hidden by SKIP LOCKED was one a claim could
-- pass uncounted); the take locks what it takes and passes, and never shares a job. A job whose
-- extra_data another process holds in memory (jobs/extra_data.py) is that process's to claim:
-- process $5 reads (and counts in `backlog`) only its own and those of none.
-- What the read counts may change before the caller's next take (the slots taken by a claim of
-- another process, the jobs taken, passed or requeued), which counts them again under the
-- backend's lock and judges the jobs at their latest versions. The read is this statement's
-- snapshot, taken before the take's locks: reading after them would hold them while the
-- dispatcher picks, or need a round trip more.
-- Returns a row: the job as dispatched but for the columns the caller's read gave it (workflow,
-- prompt, priority, created_at), or its columns null and `refusal` saying why not: raced,
-- tenant_limit, not_accepting (the backend) or no_slot (the backend's); null with no job to take.
-- Then `free`, `backlog`, `ids`, `places`, `overtaken_counts`, `fresh`, `tenants` and `beyond`
-- (null but `ids` and `beyond` when nothing is read).
WITH RECURSIVE held AS MATERIALIZED (
    -- The ids the caller holds, each list as a read gave it (`ids`, below: a uuid[] literal),
    -- sent back as one text: asyncpg encodes a list of 50 uuids in 20 us of the client's CPU,
    -- checking each element's type, and one text in 2. Cast once here, not in each row's test.
    SELECT $12::text::uuid[] AS seen, $14::text::uuid[] AS kept
), guarded AS MATERIALIZED (
    SELECT * FROM claim_locks($3, $10, $9) WHERE $1::uuid IS NOT NULL
), locked AS MATERIALIZED (
    -- Joined to `guarded`, so no row is locked before the advisory locks are held. Those
    -- ahead of the job are found as queued in this statement's snapshot: one requeued after
    -- it began is not passed by this take, which comes before it.
    SELECT jobs.id, jobs.status, jobs.overtaken FROM guarded CROSS JOIN jobs
    WHERE jobs.id = $1 OR jobs.id = ANY($2::uuid[]) OR jobs.id = ANY(ARRAY(
        SELECT ahead.id FROM held CROSS JOIN jobs AS job CROSS JOIN jobs AS ahead
        WHERE job.id = $1 AND ahead.status = 'queued'
          AND coalesce(ahead.api_key_hash, '') = coalesce(job.api_key_hash, '')
          AND ahead.priority = job.priority AND ahead.created_at < job.created_at
          AND (ahead.extra_data_holder IS NULL OR ahead.extra_data_holder = $5)
          AND NOT ahead.id = ANY(held.seen)))
    ORDER BY jobs.id
    FOR NO KEY UPDATE OF jobs
), verdict AS (
    -- An aggregate over every row of `locked`: all of them are locked before anything is
    -- judged or written (a CTE is read only as far as its reader asks).
    SELECT coalesce(bool_or(id = $1 AND status = 'queued'), false)
           AND coalesce(bool_and(id = $1 OR status <> 'queued' OR overtaken < $11::int), true)
               AS open
    FROM locked
), considered AS (
    SELECT jobs.id, jobs.api_key_hash, coalesce(jobs.api_key_hash, '') AS tenant,
           coalesce(api_keys.weight, 1) AS weight,
           CASE WHEN NOT (SELECT open FROM verdict) THEN 'raced'
                WHEN coalesce(api_keys.max_concurrent, $7::int) IS NOT NULL
                     AND (guarded.tenant_on_backends IS NULL  -- not locked: see above
                          OR guarded.tenant_on_backends
                             >= coalesce(api_keys.max_concurrent, $7::int))
                THEN 'tenant_limit'
                WHEN NOT guarded.accepting THEN 'not_accepting'
                WHEN guarded.on_gpu >= $8 THEN 'no_slot' END AS refusal
    -- Its status as this statement's snapshot has it may be older than `locked`'s.
    FROM guarded CROSS JOIN jobs LEFT JOIN api_keys ON api_keys.key_hash = jobs.api_key_hash
    WHERE jobs.id = $1
), chosen AS (
    SELECT * FROM considered WHERE refusal IS NULL
), passed AS (
    UPDATE jobs SET overtaken = jobs.overtaken + 1
    FROM locked
    WHERE jobs.id = locked.id AND locked.id <> $1 AND locked.status = 'queued'
      AND EXISTS (SELECT 1 FROM chosen)
    RETURNING jobs.id, jobs.overtaken
), clock AS (
    SELECT coalesce(max(last_start), 0) AS now FROM tenant_shares
), charged AS (
    INSERT INTO tenant_shares AS share (tenant, virtual_seconds, last_start, unsettled_seconds)
    SELECT chosen.tenant, clock.now + $6::float8 / chosen.weight, clock.now, $6::float8
    FROM chosen CROSS JOIN clock
    ON CONFLICT (tenant) DO UPDATE
    SET unsettled_seconds = share.unsettled_seconds + excluded.unsettled_seconds,
        last_start = greatest(share.virtual_seconds, excluded.last_start),
        virtual_seconds = greatest(share.virtual_seconds, excluded.last_start)
                          + (excluded.virtual_seconds - excluded.last_start)
    RETURNING share.tenant, share.virtual_seconds, share.last_start
), taken AS (
    UPDATE jobs
    SET status = 'dispatched', backend = $3, prompt_id = $4, dispatched_by = $5,
        -- The statement's time, not the transaction's: the claim may have begun before the
        -- job it takes was submitted.
        attempts = attempts + 1, dispatched_at = statement_timestamp(), started_at = NULL,
        uploading_at = NULL,
        progress = 0, charged_seconds = $6
    FROM chosen
    WHERE jobs.id = chosen.id
    -- Not the columns the caller's read gave it, which no statement changes once the job is
    -- stored (its prompt, tens of KB of JSONB, decoded again for every job taken): the
    -- caller builds the job from those and these (jobs/repository.py `_taken`).
    RETURNING jobs.id, jobs.client_task_id, jobs.params, jobs.status, jobs.progress,
        jobs.progress_detail, jobs.callback_url, jobs.backend, jobs.prompt_id, jobs.attempts,
        jobs.dispatched_at, jobs.dispatched_by, jobs.started_at, jobs.uploading_at,
        jobs.finished_at, jobs.outputs, jobs.error, jobs.webhook_events, jobs.api_key_hash,
        jobs.fingerprint, jobs.reused_from, jobs.source, jobs.labels, jobs.warnings,
        jobs.webhook_format, jobs.overtaken, jobs.extra_data_holder, jobs.charged_seconds
), gone AS (
    -- Off the backlog as the take leaves it: its job, and those it found taken (at their
    -- latest versions, which this statement's snapshot may predate: a take that raced reads
    -- what it raced with).
    SELECT id FROM taken
    UNION ALL
    SELECT id FROM locked WHERE status <> 'queued'
), slots AS (
    SELECT CASE WHEN $1::uuid IS NOT NULL THEN NULL
                WHEN EXISTS (SELECT 1 FROM backends WHERE name = $3 AND NOT draining)
                THEN $8 - (SELECT count(*) FROM jobs
                           WHERE backend = $3 AND status IN ('dispatched', 'running')
                             AND (prompt_id = ANY($9::text[])) IS NOT TRUE)
                ELSE 0 END AS free,
           (SELECT count(*) FROM (SELECT FROM jobs WHERE status = 'queued'
                                    AND (extra_data_holder IS NULL OR extra_data_holder = $5)
                                    AND id NOT IN (SELECT id FROM gone)
                                  ORDER BY coalesce(api_key_hash, '') LIMIT 2) AS seen)
               AS backlog
), backlogged (tenant) AS (
    -- A skip scan of jobs_queued_by_tenant: one index probe per tenant, however deep.
    (SELECT coalesce(api_key_hash, '') FROM jobs
     WHERE status = 'queued' AND id NOT IN (SELECT id FROM gone)
       AND coalesce((SELECT free FROM slots) > 0, true)
     ORDER BY 1 LIMIT 1)
    UNION ALL
    SELECT (SELECT coalesce(api_key_hash, '') FROM jobs
            WHERE status = 'queued' AND coalesce(api_key_hash, '') > backlogged.tenant
              AND id NOT IN (SELECT id FROM gone)
            ORDER BY 1 LIMIT 1)
    FROM backlogged WHERE backlogged.tenant IS NOT NULL
), read_clock AS (
    SELECT greatest(clock.now, (SELECT last_start FROM charged)) AS now FROM clock
), eligible AS (
    SELECT backlogged.tenant,
           greatest(coalesce(charged.virtual_seconds, tenant_shares.virtual_seconds),
                    read_clock.now) AS start,
           coalesce(api_keys.weight, 1) AS weight,
           limits.max_concurrent IS NOT NULL AS limited
    FROM backlogged CROSS JOIN read_clock
    LEFT JOIN tenant_shares ON tenant_shares.tenant = backlogged.tenant
    LEFT JOIN charged ON charged.tenant = backlogged.tenant
    LEFT JOIN api_keys ON api_keys.key_hash = nullif(backlogged.tenant, '')
    CROSS JOIN LATERAL (SELECT coalesce(api_keys.max_concurrent, $7::int) AS max_concurrent)
        AS limits
    WHERE backlogged.tenant IS NOT NULL
      -- A tenant's jobs on backends (with the one this statement took, which its snapshot
      -- does not see) are counted only when it has a limit, by index, as claim_locks()
      -- counts them (jobs_on_backends(), migration 0040): counting every tenant's was the
      -- claim's largest cost, growing with the jobs on backends.
      AND (limits.max_concurrent IS NULL
           OR limits.max_concurrent
              > jobs_on_backends(backlogged.tenant)
                + (SELECT count(*) FROM taken
                   WHERE coalesce(taken.api_key_hash, '') = backlogged.tenant))
    ORDER BY start, backlogged.tenant
    LIMIT $13
), heads AS (
    SELECT eligible.*, ceil($13::float8 / count(*) OVER ())::int AS depth FROM eligible
), queued AS (
    -- Each tenant's head, with the place of each job the caller holds in what it holds. Its
    -- columns that never change are read below only for the jobs the caller does not hold:
    -- carried through the window and the sort for every job read, the prompt alone cost
    -- PostgreSQL 0.1 ms a claim.
    SELECT heads.tenant, heads.start, heads.weight, heads.limited, heads.depth, head.id,
           head.place, array_position((SELECT seen || kept FROM held), head.id) AS held_at,
           coalesce(passed.overtaken, locked.overtaken, head.overtaken) AS overtaken
    FROM heads CROSS JOIN LATERAL (
        SELECT id, overtaken, row_number() OVER (ORDER BY priority DESC, created_at) AS place
        FROM jobs
        WHERE status = 'queued' AND coalesce(api_key_hash, '') = heads.tenant
          AND (extra_data_holder IS NULL OR extra_data_holder = $5)
          AND id NOT IN (SELECT id FROM gone)
        ORDER BY priority DESC, created_at
        LIMIT heads.depth
    ) AS head
    LEFT JOIN passed ON passed.id = head.id
    LEFT JOIN locked ON locked.id = head.id
), read AS (
    -- One pass in one order: a tenant's values with its first job read, and `beyond` once (a
    -- second pass for the tenants, grouping the jobs read, had them kept in a tuplestore).
    SELECT coalesce(array_agg(id ORDER BY start, tenant, place)::text, '{}') AS ids,
           array_agg(coalesce(held_at, 0) ORDER BY start, tenant, place) AS places,
           array_agg(overtaken ORDER BY start, tenant, place) AS overtaken_counts,
           array_agg((SELECT (stored.id, stored.workflow, stored.prompt::text, stored.priority,
                              stored.created_at, queued.tenant)::claim_job
                      FROM jobs AS stored WHERE stored.id = queued.id)
                     ORDER BY start, tenant, place) FILTER (WHERE held_at IS NULL) AS fresh,
           array_agg((tenant, start, weight, limited)::claim_tenant
                     ORDER BY start, tenant, place) FILTER (WHERE place = 1) AS tenants,
           coalesce(bool_or(place = depth), false) AS beyond
    FROM queued
)
SELECT taken.*, CASE WHEN $1::uuid IS NULL THEN NULL
                     WHEN verdict.open THEN considered.refusal ELSE 'raced' END AS refusal,
       slots.free, slots.backlog, read.*
FROM verdict LEFT JOIN considered ON true LEFT JOIN taken ON true
CROSS JOIN slots CROSS JOIN read

-- name: insert_taken
-- Store job $1 already taken: dispatched to backend $6 as prompt $7, followed by process $8,
-- its tenant charged $9 estimated GPU-seconds over its weight, as `claim`'s take would take
-- it once stored, with no read and no other job passed: the pick of a dispatcher that was
-- idle with nothing queued chose the backend in memory, on the job alone, before the insert
-- (Dispatcher.claim_on_submit), and the insert and its take are one statement and one commit.
-- Stored as jobs.sql `insert` stores a job (a client_task_id taken: nothing written, no row;
-- the idempotency claim of holder $5 on key $4 of $2 among the keys of $3 let go with it).
-- Refused, nothing is written: when any job is queued (by now the dispatcher's passes, or its
-- claim in the insert's transaction, take the jobs in their order; and nothing queued, no
-- backlog is full), or the take would be refused as `claim` refuses one, counted by
-- claim_locks() under the same locks: tenant_limit (its key's max_concurrent, $10 for keys
-- without their own; $11 is the key's digest, null for none), not_accepting, no_slot ($12
-- prompts on the backend, those $13 not counted). The locks are the backend's, and the
-- tenant's when it has a limit as this statement's snapshot reads it.
-- Returns a row: `refusal` (null: stored, or a repeat) and the columns a take sets, as stored
-- (null when nothing was).
WITH tenant AS MATERIALIZED (
    SELECT coalesce($11::text, '') AS tenant, coalesce(api_keys.weight, 1) AS weight,
           coalesce(api_keys.max_concurrent, $10::int) AS max_concurrent
    FROM (SELECT) AS one LEFT JOIN api_keys ON api_keys.key_hash = $11::text
), verdict AS MATERIALIZED (
    SELECT tenant.tenant, tenant.weight,
           CASE WHEN (SELECT true FROM jobs WHERE status = 'queued'
                      ORDER BY coalesce(api_key_hash, '') LIMIT 1) THEN 'queued'
                WHEN locks.tenant_on_backends >= tenant.max_concurrent THEN 'tenant_limit'
                WHEN NOT locks.accepting THEN 'not_accepting'
                WHEN locks.on_gpu >= $12 THEN 'no_slot' END AS refusal
    FROM tenant CROSS JOIN LATERAL claim_locks(
        $6, CASE WHEN tenant.max_concurrent IS NOT NULL THEN tenant.tenant END, $13) AS locks
), stored AS (
    INSERT INTO jobs
    SELECT job.* FROM verdict CROSS JOIN LATERAL jsonb_populate_record(NULL::jobs,
        $1::jsonb || jsonb_build_object(
            'status', 'dispatched', 'backend', $6::text, 'prompt_id', $7::text,
            'dispatched_by', $8::int, 'attempts', 1, 'charged_seconds', $9::float8,
            'dispatched_at', statement_timestamp())) AS job
    WHERE verdict.refusal IS NULL
    ON CONFLICT ((coalesce(api_key_hash, '')), source, client_task_id)
        WHERE client_task_id IS NOT NULL DO NOTHING
    RETURNING status, progress, progress_detail, backend, prompt_id, attempts, dispatched_at,
        dispatched_by, started_at, uploading_at, finished_at, outputs, error
), released AS (
    DELETE FROM idempotency_claims
    WHERE tenant = $2::text AND scope = $3::text AND key = $4::text AND token = $5::text
      AND EXISTS (SELECT FROM stored)
), clock AS (
    SELECT coalesce(max(last_start), 0) AS now FROM tenant_shares
), charged AS (
    -- As `claim` charges, from the fleet's virtual clock on.
    INSERT INTO tenant_shares AS share (tenant, virtual_seconds, last_start, unsettled_seconds)
    SELECT verdict.tenant, clock.now + $9::float8 / verdict.weight, clock.now, $9::float8
    FROM verdict CROSS JOIN clock
    WHERE EXISTS (SELECT FROM stored)
    ON CONFLICT (tenant) DO UPDATE
    SET unsettled_seconds = share.unsettled_seconds + excluded.unsettled_seconds,
        last_start = greatest(share.virtual_seconds, excluded.last_start),
        virtual_seconds = greatest(share.virtual_seconds, excluded.last_start)
                          + (excluded.virtual_seconds - excluded.last_start)
)
SELECT verdict.refusal, stored.* FROM verdict LEFT JOIN stored ON true

-- name: place
-- Where queued job $1 stands in fair share, counted while fewer than $2 jobs are queued: a row
-- per tenant with queued work, its own first (`own`), each with its jobs queued, those of them
-- ahead of job $1 by priority and age, its start in virtual time and its weight; with $2 or more
-- queued, one row, `deep`, and nothing counted (at 100,000 queued jobs the count is 50 ms, and
-- the asks waiting for a snapshot of the backlog, `backlog` below, need only know it is deep: the
-- first ones after a backlog written behind the process's back, counting side by side, piled up).
-- A row of nulls but `deep`: nothing queued, or job $1 no longer is.
WITH deep AS (
    SELECT count(*) >= $2 AS deep
    FROM (SELECT FROM jobs WHERE status = 'queued' ORDER BY coalesce(api_key_hash, '') LIMIT $2)
        AS queued
), job AS (
    SELECT coalesce(api_key_hash, '') AS tenant, priority, created_at FROM jobs WHERE id = $1
), clock AS (
    SELECT coalesce(max(last_start), 0) AS now FROM tenant_shares
), backlog AS (
    SELECT coalesce(jobs.api_key_hash, '') AS tenant, count(*) AS queued,
           count(*) FILTER (WHERE jobs.priority > job.priority
                            OR (jobs.priority = job.priority
                                AND jobs.created_at < job.created_at)) AS ahead
    FROM jobs CROSS JOIN job
    WHERE jobs.status = 'queued' AND NOT (SELECT deep FROM deep)
    GROUP BY coalesce(jobs.api_key_hash, '')
), counted AS (
    SELECT backlog.tenant = job.tenant AS own, backlog.queued, backlog.ahead,
           greatest(tenant_shares.virtual_seconds, clock.now) AS start,
           coalesce(api_keys.weight, 1) AS weight
    FROM backlog CROSS JOIN job CROSS JOIN clock
    LEFT JOIN tenant_shares ON tenant_shares.tenant = backlog.tenant
    LEFT JOIN api_keys ON api_keys.key_hash = nullif(backlog.tenant, '')
)
SELECT deep.deep, counted.* FROM deep LEFT JOIN counted ON true
ORDER BY counted.own DESC NULLS LAST

-- name: queued_estimate
-- How many are queued as PostgreSQL's statistics last estimated it (the entries of the queued
-- ones' index when ANALYZE or autovacuum last looked; -1 before): read without the table.
SELECT reltuples::int8 FROM pg_class WHERE oid = 'jobs_queued_by_tenant'::regclass

-- name: deep
-- Whether $1 jobs or more are queued (reading $1 of them at most).
SELECT count(*) >= $1 AS deep
FROM (SELECT FROM jobs WHERE status = 'queued' ORDER BY coalesce(api_key_hash, '') LIMIT $1)
    AS queued

-- name: backlog
-- Every queued job's place in the order fair share serves, for queue positions counted from
-- a snapshot (jobs/positions.py; `place` counts them all for one job): a row per tenant and
-- priority with the created_at of each of its queued jobs, oldest first (whole microseconds
-- since the epoch), the tenant's start in virtual time and weight, and the virtual clock.
-- Grouped in the order of jobs_queued_by_tenant (tenant, priority DESC, created_at), which
-- holds every column read (migration 0047): an index-only scan, nothing sorted, 30-55 ms at
-- 100,000 queued jobs. Grouped by priority ascending, as the index does not give them, the
-- read sorted every queued job (on disk), or read their heap pages and sorted: 0.1-0.5 s.
WITH queued AS (
    SELECT coalesce(api_key_hash, '') AS tenant, priority,
           array_agg((extract(epoch FROM created_at) * 1000000)::int8 ORDER BY created_at)
               AS created
    FROM jobs WHERE status = 'queued'
    GROUP BY 1, 2 ORDER BY 1, 2 DESC
), clock AS (
    SELECT coalesce(max(last_start), 0) AS now FROM tenant_shares
)
SELECT queued.tenant, queued.priority, queued.created,
       greatest(tenant_shares.virtual_seconds, clock.now) AS start,
       coalesce(api_keys.weight, 1) AS weight, clock.now AS clock
FROM queued CROSS JOIN clock
LEFT JOIN tenant_shares ON tenant_shares.tenant = queued.tenant
LEFT JOIN api_keys ON api_keys.key_hash = nullif(queued.tenant, '')
