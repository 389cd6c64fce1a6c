-- Durable events: one row per channel (its offset counter and lock), one per event.
CREATE TABLE channels (
    name        text PRIMARY KEY,
    last_offset bigint NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE events (
    channel  text NOT NULL,
    "offset" bigint NOT NULL,
    type     text NOT NULL,
    data     text NOT NULL,          -- the JSON value as published (json/jsonb would reject \u0000)
    time     timestamptz NOT NULL,
    PRIMARY KEY (channel, "offset")
);
CREATE INDEX events_time ON events (time);

CREATE TABLE idempotency_keys (
    channel     text NOT NULL,
    key         text NOT NULL,
    fingerprint bytea NOT NULL,      -- sha256 of type and data: the same key with another body is a conflict
    "offset"    bigint NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (channel, key)
);
CREATE INDEX idempotency_keys_created_at ON idempotency_keys (created_at);

-- Live subscriptions per serving process, refreshed while the process runs.
CREATE TABLE subscriber_counts (
    process    text NOT NULL,
    channel    text NOT NULL,
    count      integer NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (process, channel)
);
