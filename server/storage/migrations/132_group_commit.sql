-- Group commit (issue 12) sends many requests in one publish_batch call with
-- p_skip_locked, so one held channel must not make the whole batch wait: migration 130's
-- version created missing channel rows with an insert that waits for a channel whose
-- first event an open transaction is storing. This version leaves such a channel out
-- (its requests come back busy and are published alone, waiting publish_wait at most).

-- Herald's own publishes: many items, one statement, one commit (group commit, batch
-- endpoints). Items of one request are stored all or none (a failing item fails the
-- statement; the caller retries the other requests without it). Channel rows are locked
-- in name order, so two batches never deadlock. With p_skip_locked, a request touching a
-- channel that an open transaction holds comes back 'busy' instead of holding up the
-- rest; the caller then publishes it alone, waiting at most p_wait_ms. An idempotency
-- key seen within 24 h answers the first event ('replay'), or 'conflict' for another body.
CREATE OR REPLACE FUNCTION publish_batch(
    p_requests integer[], p_channels text[], p_types text[], p_datas text[],
    p_keys text[], p_fingerprints bytea[], p_wait_ms integer, p_skip_locked boolean
) RETURNS TABLE (item integer, status text, stored_offset bigint, stored_json text)
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
#variable_conflict use_column
DECLARE
    locked text[];
    new_channel text;
    busy_requests integer[] := '{}';
    previous record;
BEGIN
    -- Rows for new channels first, in name order. Only the missing ones: an upsert would
    -- wait on a row another transaction holds, the very wait SKIP LOCKED below avoids. A
    -- channel whose first event an open transaction is storing cannot be created without
    -- waiting for it: with p_skip_locked, such a channel is left out (and comes back busy).
    IF p_skip_locked THEN
        PERFORM set_config('lock_timeout', '20ms', true);
        BEGIN
            INSERT INTO channels (name, last_offset)
                SELECT DISTINCT c, 0 FROM unnest(p_channels) AS c
                WHERE NOT EXISTS (SELECT 1 FROM channels WHERE name = c) ORDER BY 1
                ON CONFLICT (name) DO NOTHING;
        EXCEPTION WHEN lock_not_available THEN
            FOR new_channel IN
                SELECT DISTINCT c FROM unnest(p_channels) AS c
                WHERE NOT EXISTS (SELECT 1 FROM channels WHERE name = c) ORDER BY 1
            LOOP
                BEGIN
                    INSERT INTO channels (name, last_offset) VALUES (new_channel, 0) ON CONFLICT (name) DO NOTHING;
                EXCEPTION WHEN lock_not_available THEN
                    NULL;
                END;
            END LOOP;
        END;
    END IF;
    PERFORM set_config('lock_timeout', p_wait_ms || 'ms', true);
    IF NOT p_skip_locked THEN
        INSERT INTO channels (name, last_offset)
            SELECT DISTINCT c, 0 FROM unnest(p_channels) AS c
            WHERE NOT EXISTS (SELECT 1 FROM channels WHERE name = c) ORDER BY 1
            ON CONFLICT (name) DO NOTHING;
    END IF;
    IF p_skip_locked THEN
        SELECT coalesce(array_agg(l.name), '{}') INTO locked
            FROM (SELECT name FROM channels WHERE name = ANY (p_channels) ORDER BY name FOR UPDATE SKIP LOCKED) l;
        busy_requests := ARRAY(SELECT DISTINCT u.r FROM unnest(p_requests, p_channels) AS u (r, c) WHERE u.c <> ALL (locked));
    ELSE
        PERFORM 1 FROM channels WHERE name = ANY (p_channels) ORDER BY name FOR UPDATE;
    END IF;
    FOR i IN 1 .. coalesce(array_length(p_channels, 1), 0) LOOP
        item := i;
        stored_offset := NULL;
        stored_json := NULL;
        IF p_requests[i] = ANY (busy_requests) THEN
            status := 'busy';
            RETURN NEXT;
            CONTINUE;
        END IF;
        IF p_keys[i] IS NOT NULL THEN
            SELECT k.fingerprint, k."offset" INTO previous FROM idempotency_keys k
                WHERE k.channel = p_channels[i] AND k.key = p_keys[i] AND k.created_at > now() - interval '24 hours';
            IF FOUND THEN
                IF previous.fingerprint <> p_fingerprints[i] THEN
                    status := 'conflict';
                    RETURN NEXT;
                    CONTINUE;
                END IF;
                SELECT e."offset", event_json(e.channel, e."offset", e.type, e.data, e.time)
                    INTO stored_offset, stored_json
                    FROM events e WHERE e.channel = p_channels[i] AND e."offset" = previous."offset";
                IF FOUND THEN
                    status := 'replay';
                    RETURN NEXT;
                    CONTINUE;
                END IF;
            END IF;
        END IF;
        SELECT s.stored_offset, s.stored_json INTO stored_offset, stored_json
            FROM store_event(p_channels[i], p_types[i], p_datas[i]) s;
        IF p_keys[i] IS NOT NULL THEN
            INSERT INTO idempotency_keys AS k (channel, key, fingerprint, "offset")
                VALUES (p_channels[i], p_keys[i], p_fingerprints[i], stored_offset)
                ON CONFLICT (channel, key) DO UPDATE
                SET fingerprint = excluded.fingerprint, "offset" = excluded."offset", created_at = now();
        END IF;
        status := 'new';
        RETURN NEXT;
    END LOOP;
END
$$;
