-- Hardening of the REST API (issue 9).
--
-- 1. v1 pairing codes are stored as a keyed hash: the `code` column of
-- `pairing` now holds HMAC-SHA256(code) under a key derived from the server
-- secret (as `pairing_v2.code_key` does), so a reader of the database cannot
-- redeem live codes. Existing rows are keyed by the plaintext code; they are
-- EXPIRED (deleted), not converted: plain SQL has no access to the server
-- secret, so this migration cannot compute the keyed hash, and a record lives
-- at most 10 minutes, so the cost is at most one repeated pairing attempt for
-- a user who was pairing during the upgrade (the lookup answers 404 "not
-- found or expired" and the old device shows a new code). Keeping them would
-- leave plaintext live codes in the database.
DELETE FROM pairing;

-- 2. The replay cache of signed REST requests (API.md §1.1) when no Redis is
-- configured, so that a restart does not forget which signatures were used.
-- One row per accepted signature until ts + auth window; every insert first
-- deletes a bounded number of expired rows (oldest first, by the index), so
-- the table holds about the signed requests accepted in the last two auth
-- windows (ts may be up to one window ahead of the clock).
CREATE TABLE replay_cache (
    sig TEXT PRIMARY KEY,
    expires_at BIGINT NOT NULL
);
CREATE INDEX replay_cache_expires ON replay_cache (expires_at);
