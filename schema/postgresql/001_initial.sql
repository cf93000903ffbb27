-- PocketBridge schema, PostgreSQL dialect, version 1.
CREATE TABLE users (
    user_id TEXT PRIMARY KEY,
    head_seq BIGINT NOT NULL DEFAULT 0,
    purged_below_seq BIGINT NOT NULL DEFAULT 0,
    stored_bytes BIGINT NOT NULL DEFAULT 0,
    created_at BIGINT NOT NULL,
    last_activity BIGINT NOT NULL
);

CREATE TABLE devices (
    user_id TEXT NOT NULL,
    device_id TEXT NOT NULL,
    name TEXT,
    type TEXT NOT NULL DEFAULT 'unknown',
    created_at BIGINT NOT NULL,
    last_seen BIGINT NOT NULL,
    last_device_seq BIGINT NOT NULL DEFAULT 0,
    delivered_seq BIGINT NOT NULL DEFAULT 0,
    stuck_seq BIGINT NOT NULL DEFAULT 0,
    stuck_count BIGINT NOT NULL DEFAULT 0,
    revoked_at BIGINT,
    PRIMARY KEY (user_id, device_id)
);

CREATE TABLE events (
    user_id TEXT NOT NULL,
    seq BIGINT NOT NULL,
    event_id TEXT NOT NULL,
    device_id TEXT NOT NULL,
    device_seq BIGINT NOT NULL,
    stream_id TEXT NOT NULL,
    stream_seq BIGINT NOT NULL,
    type TEXT NOT NULL,
    encrypted_payload TEXT NOT NULL,
    payload_size BIGINT NOT NULL,
    ttl BIGINT,
    created_at BIGINT NOT NULL,
    PRIMARY KEY (user_id, seq)
);
CREATE UNIQUE INDEX events_event_id ON events (user_id, event_id);
CREATE UNIQUE INDEX events_device_seq ON events (user_id, device_id, device_seq);
CREATE INDEX events_ttl ON events (ttl) WHERE ttl IS NOT NULL;
CREATE INDEX events_created ON events (created_at);

CREATE TABLE streams (
    user_id TEXT NOT NULL,
    stream_id TEXT NOT NULL,
    head BIGINT NOT NULL,
    PRIMARY KEY (user_id, stream_id)
);

CREATE TABLE pairing (
    code TEXT PRIMARY KEY,
    user_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    sealed BYTEA NOT NULL,
    created_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL
);
CREATE INDEX pairing_expires ON pairing (expires_at);

CREATE TABLE profiles (
    user_id TEXT PRIMARY KEY,
    display_name TEXT,
    email TEXT,
    avatar_url TEXT,
    preferences TEXT NOT NULL DEFAULT '{}',
    onboarding_completed BIGINT NOT NULL DEFAULT 0,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);
