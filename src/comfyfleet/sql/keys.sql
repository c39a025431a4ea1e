-- The API keys (api_keys.py), as every request's check reads them through its short cache.
-- The writes (`comfyfleet keys create|update|revoke`) are administration, off the hot path.

-- name: live_key
-- What the live key with the digest $1 grants; no row: no such live key.
SELECT admin, weight, max_concurrent, max_queued, callback_url
FROM api_keys WHERE key_hash = $1 AND revoked_at IS NULL

-- name: any_live
-- Whether any key is live (then the API needs keys even without API_KEYS).
SELECT EXISTS (SELECT FROM api_keys WHERE revoked_at IS NULL)
