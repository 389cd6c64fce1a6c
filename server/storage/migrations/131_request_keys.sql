-- Idempotency-Key of a whole batch or broadcast request (PROTOCOL §11): scoped to the
-- caller and the endpoint, it remembers the first answer for 24 hours.
CREATE TABLE request_keys (
    scope       text NOT NULL,        -- endpoint and caller
    key         text NOT NULL,
    fingerprint bytea NOT NULL,       -- sha256 of the request's items: another body is a conflict
    response    text NOT NULL,        -- the first answer's body
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (scope, key)
);
CREATE INDEX request_keys_created_at ON request_keys (created_at);

-- One keyed request, all or none, in one transaction with its key: a concurrent duplicate
-- waits on the key's uncommitted row, then answers the first result ('replay') or
-- 'conflict' for another body. Never two stores.
CREATE FUNCTION publish_request(
    p_scope text, p_key text, p_fingerprint bytea, p_channels text[], p_types text[], p_datas text[], p_wait_ms integer
) RETURNS TABLE (out_status text, out_response text)
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
#variable_conflict use_column
DECLARE
    n integer := coalesce(array_length(p_channels, 1), 0);
    previous record;
BEGIN
    PERFORM set_config('lock_timeout', p_wait_ms || 'ms', true);
    DELETE FROM request_keys k
        WHERE k.scope = p_scope AND k.key = p_key AND k.created_at <= now() - interval '24 hours';
    INSERT INTO request_keys (scope, key, fingerprint, response) VALUES (p_scope, p_key, p_fingerprint, '')
        ON CONFLICT (scope, key) DO NOTHING;
    IF NOT FOUND THEN
        SELECT k.fingerprint, k.response INTO previous FROM request_keys k WHERE k.scope = p_scope AND k.key = p_key;
        IF previous.fingerprint = p_fingerprint THEN
            out_status := 'replay';
            out_response := previous.response;
        ELSE
            out_status := 'conflict';
        END IF;
        RETURN NEXT;
        RETURN;
    END IF;
    SELECT '{"items":[' || string_agg(b.stored_json, ',' ORDER BY b.item) || ']}' INTO out_response
        FROM publish_batch(array_fill(0, ARRAY[n]), p_channels, p_types, p_datas,
                           array_fill(NULL::text, ARRAY[n]), array_fill(NULL::bytea, ARRAY[n]), p_wait_ms, false) b;
    UPDATE request_keys k SET response = out_response WHERE k.scope = p_scope AND k.key = p_key;
    out_status := 'new';
    RETURN NEXT;
END
$$;

REVOKE EXECUTE ON FUNCTION publish_request(text, text, bytea, text[], text[], text[], integer) FROM PUBLIC;
