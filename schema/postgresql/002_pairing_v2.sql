-- PAKE pairing mailboxes (API.md "Pairing, v2"). The code is stored only as an
-- HMAC under a server secret, and B's token only as a hash.
CREATE TABLE pairing_v2 (
    code_key TEXT PRIMARY KEY,
    user_id TEXT NOT NULL,
    device_id TEXT NOT NULL,
    msg_a TEXT NOT NULL,
    msg_b TEXT,
    b_token_hash TEXT,
    sealed TEXT,
    state TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL
);
CREATE INDEX pairing_v2_expires ON pairing_v2 (expires_at);
