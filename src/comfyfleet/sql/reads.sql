-- The API's reads on every request for one job (jobs/repository.py): a status poll is the
-- most frequent request a gateway answers, so it is one prepared statement, one round trip,
-- with no statement built or ORM object loaded per poll.

-- name: job
-- The job with id $1, if any.
SELECT * FROM jobs WHERE id = $1
