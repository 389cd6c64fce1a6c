-- Two workers publishing on one channel: each flight found the channel locked by the
-- other's for the length of a commit, and sent its requests down the one-by-one path
-- (measured: 2 workers stored a quarter of what one did on one channel). A flight now
-- waits up to 100 ms for all its channels before it leaves the held ones out.

CREATE OR REPLACE FUNCTION publish_batch(
    p_requests integer[], p_channels text[], p_types text[], p_datas text[],
    p_keys text[], p_fingerprints bytea[], p_wait_ms integer, p_skip_locked boolean
) RETURNS TABLE (item integer, status text, stored_offset bigint, stored_json text)
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
#variable_conflict use_column
DECLARE
    n integer := coalesce(array_length(p_channels, 1), 0);
    locked text[];
    new_channel text;
    busy_requests integer[] := '{}';
    statuses text[] := array_fill(NULL::text, ARRAY[n]);
    offsets bigint[] := array_fill(NULL::bigint, ARRAY[n]);
    jsons text[] := array_fill(NULL::text, ARRAY[n]);
    repeats integer[] := array_fill(NULL::integer, ARRAY[n]);  -- a replay of an earlier item of this batch
    seen jsonb := '{}';  -- channel and key of this batch's keyed items -> the item
    to_store integer[] := '{}';
    previous record;
    earlier integer;
    found_offset bigint;
    found_json text;
    stored record;
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
        -- Another worker's flight holds a channel for one commit: wait that long, all
        -- channels locked in name order; a channel held longer (an open transaction of an
        -- application's) makes its requests busy below instead of holding up the batch.
        PERFORM set_config('lock_timeout', '100ms', true);
        BEGIN
            PERFORM 1 FROM channels WHERE name = ANY (p_channels) ORDER BY name FOR UPDATE;
        EXCEPTION WHEN lock_not_available THEN
            NULL;  -- the locks taken in this block went with it; SKIP LOCKED takes what it can
        END;
        PERFORM set_config('lock_timeout', p_wait_ms || 'ms', true);
        SELECT coalesce(array_agg(l.name), '{}') INTO locked
            FROM (SELECT name FROM channels WHERE name = ANY (p_channels) ORDER BY name FOR UPDATE SKIP LOCKED) l;
        busy_requests := ARRAY(SELECT DISTINCT u.r FROM unnest(p_requests, p_channels) AS u (r, c) WHERE u.c <> ALL (locked));
    ELSE
        PERFORM 1 FROM channels WHERE name = ANY (p_channels) ORDER BY name FOR UPDATE;
    END IF;
    FOR i IN 1 .. n LOOP
        IF p_requests[i] = ANY (busy_requests) THEN
            statuses[i] := 'busy';
            CONTINUE;
        END IF;
        IF p_keys[i] IS NOT NULL THEN
            earlier := (seen ->> (p_channels[i] || E'\n' || p_keys[i]))::integer;
            IF earlier IS NOT NULL THEN
                IF p_fingerprints[earlier] = p_fingerprints[i] THEN
                    statuses[i] := 'replay';
                    repeats[i] := earlier;
                ELSE
                    statuses[i] := 'conflict';
                END IF;
                CONTINUE;
            END IF;
            SELECT k.fingerprint, k."offset" INTO previous FROM idempotency_keys k
                WHERE k.channel = p_channels[i] AND k.key = p_keys[i] AND k.created_at > now() - interval '24 hours';
            IF FOUND THEN
                IF previous.fingerprint <> p_fingerprints[i] THEN
                    statuses[i] := 'conflict';
                    CONTINUE;
                END IF;
                SELECT e."offset", event_json(e.channel, e."offset", e.type, e.data, e.time)
                    INTO found_offset, found_json
                    FROM events e WHERE e.channel = p_channels[i] AND e."offset" = previous."offset";
                IF FOUND THEN
                    statuses[i] := 'replay';
                    offsets[i] := found_offset;
                    jsons[i] := found_json;
                    CONTINUE;
                END IF;
            END IF;
            seen := seen || jsonb_build_object(p_channels[i] || E'\n' || p_keys[i], i);
        END IF;
        statuses[i] := 'new';
        to_store := to_store || i;
    END LOOP;
    IF cardinality(to_store) > 0 THEN
        FOR stored IN
            SELECT s.item, s.stored_offset, s.stored_json FROM store_events(
                ARRAY(SELECT p_channels[x] FROM unnest(to_store) WITH ORDINALITY AS t (x, o) ORDER BY o),
                ARRAY(SELECT p_types[x] FROM unnest(to_store) WITH ORDINALITY AS t (x, o) ORDER BY o),
                ARRAY(SELECT p_datas[x] FROM unnest(to_store) WITH ORDINALITY AS t (x, o) ORDER BY o)) s
        LOOP
            offsets[to_store[stored.item]] := stored.stored_offset;
            jsons[to_store[stored.item]] := stored.stored_json;
        END LOOP;
        INSERT INTO idempotency_keys AS k (channel, key, fingerprint, "offset")
            SELECT p_channels[x], p_keys[x], p_fingerprints[x], offsets[x] FROM unnest(to_store) AS x
            WHERE p_keys[x] IS NOT NULL
            ON CONFLICT (channel, key) DO UPDATE
            SET fingerprint = excluded.fingerprint, "offset" = excluded."offset", created_at = now();
    END IF;
    FOR i IN 1 .. n LOOP
        IF repeats[i] IS NOT NULL THEN
            offsets[i] := offsets[repeats[i]];
            jsons[i] := jsons[repeats[i]];
        END IF;
    END LOOP;
    RETURN QUERY SELECT u.i::integer, u.s, u.o, u.j FROM unnest(statuses, offsets, jsons) WITH ORDINALITY AS u (s, o, j, i);
END
$$;
