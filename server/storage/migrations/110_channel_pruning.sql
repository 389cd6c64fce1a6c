-- Channels that have no events left are pruned (issue 11), but only once a whole history TTL
-- has passed since they emptied, and never while anyone follows them or an idempotency key
-- still names one of their offsets: a channel that comes back within that time keeps
-- counting where it was, so no client ever sees an offset a second time.
ALTER TABLE channels ADD COLUMN emptied_at timestamptz;
CREATE INDEX channels_emptied_at ON channels (emptied_at) WHERE emptied_at IS NOT NULL;
-- Rows already empty start their wait now.
UPDATE channels c SET emptied_at = now() WHERE NOT EXISTS (SELECT 1 FROM events e WHERE e.channel = c.name);
