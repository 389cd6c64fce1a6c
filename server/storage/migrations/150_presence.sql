-- Presence and subscriber counts, one mechanism (PROTOCOL §14): every serving process
-- beats in presence_processes and keeps, in presence_entries, one row per channel and
-- member it serves (member '' gathers anonymous subscriptions, and every subscription of
-- a channel without presence). Rows are written only where a count changed; readers
-- ignore processes that stopped beating, and the first live process to notice deletes
-- them (their entries go with them).
DROP TABLE subscriber_counts;

CREATE TABLE presence_processes (
    process text PRIMARY KEY,
    beat_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX presence_processes_beat_at ON presence_processes (beat_at);

CREATE TABLE presence_entries (
    process     text NOT NULL REFERENCES presence_processes (process) ON DELETE CASCADE,
    channel     text NOT NULL,
    member      text NOT NULL,          -- the identity's id, or '' (anonymous / counted only)
    username    text NOT NULL DEFAULT '',
    connections integer NOT NULL CHECK (connections > 0),
    PRIMARY KEY (process, channel, member)
);
CREATE INDEX presence_entries_channel ON presence_entries (channel, member);
