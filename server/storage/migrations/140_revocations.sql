-- Revoked identities (PROTOCOL §13): tokens of `identity_id` with iat <= revoked_at are refused
-- until expires_at, when no such token can still be valid; then the row is pruned.
CREATE TABLE revocations (
    identity_id text PRIMARY KEY,
    revoked_at  bigint NOT NULL,
    expires_at  bigint NOT NULL
);
CREATE INDEX revocations_expires_at ON revocations (expires_at);
