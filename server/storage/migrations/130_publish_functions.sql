-- The one definition of storing an event (PROTOCOL §12). REST, WebSocket, batch and
-- group-committed publishes reach store_events through publish_batch; applications call
-- publish() inside their own transactions, and row triggers publish_row_changes().
-- The schema is the first entry of the runner's search_path; SECURITY DEFINER functions
-- pin that path (SET search_path FROM CURRENT), so a caller's path cannot redirect them.

-- An event as every transport shows it, built once so the publisher's answer, the NOTIFY
-- payload, history and every subscriber's frame are the same bytes. Channel and type are
-- restricted to characters that need no JSON escaping; data is JSON text already.
-- (Plain SQL with no SET clause, so the planner inlines it into history queries.)
CREATE FUNCTION event_json(text, bigint, text, text, timestamptz) RETURNS text
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT '{"channel":"' || $1 || '","offset":' || $2 || ',"type":"' || $3 || '","data":' || $4
        || ',"time":"' || to_char($5 AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"') || '"}'
$$;

-- The same rules as the REST side (server/identity/permissions.py CHANNEL_NAME,
-- server/events/store.py EVENT_TYPE), so a SQL publisher cannot store what REST refuses.
CREATE FUNCTION check_event(channel text, type text) RETURNS void
LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    IF channel IS NULL OR channel !~ '^[A-Za-z0-9_.:@-]{1,128}$' THEN
        RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
            MESSAGE = 'herald.publish: channel must be 1 to 128 characters of A-Z a-z 0-9 _ . : @ -',
            DETAIL = format('channel = %s', left(quote_nullable(channel), 200));
    END IF;
    IF type !~ '^[A-Za-z0-9_.:-]{1,64}$' THEN
        RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
            MESSAGE = 'herald.publish: type must be 1 to 64 characters of A-Z a-z 0-9 _ . : -',
            DETAIL = format('type = %s', left(quote_literal(type), 200));
    END IF;
END
$$;

-- Store events in list order: each channel's counter moves once by its count of events
-- (its row lock held until the caller's transaction ends, so offsets are gapless in
-- commit order), the events get consecutive offsets in list order, and NOTIFY (sent at
-- commit, in order) reaches every process and instance. Rows are bumped in channel name
-- order, so two callers never deadlock on each other's channels.
CREATE FUNCTION store_events(p_channels text[], p_types text[], p_datas text[])
RETURNS TABLE (item bigint, stored_offset bigint, stored_json text)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    items bigint[];
    offsets bigint[];
    jsons text[];
    channels_of text[];
BEGIN
    PERFORM check_event(u.c, coalesce(u.t, 'message')) FROM unnest(p_channels, p_types) AS u (c, t);
    WITH listed AS (
        SELECT u.i AS item, u.c AS channel, coalesce(u.t, 'message') AS type, coalesce(u.d, 'null') AS data,
               row_number() OVER (PARTITION BY u.c ORDER BY u.i) AS nth, count(*) OVER (PARTITION BY u.c) AS n
        FROM unnest(p_channels, p_types, p_datas) WITH ORDINALITY AS u (c, t, d, i)
    ), bumped AS (
        INSERT INTO channels AS ch (name, last_offset)
            SELECT DISTINCT l.channel, l.n FROM listed l ORDER BY 1
            ON CONFLICT (name) DO UPDATE SET last_offset = ch.last_offset + excluded.last_offset
            RETURNING ch.name, ch.last_offset
    ), placed AS (
        SELECT l.*, b.last_offset - l.n + l.nth AS "offset" FROM listed l JOIN bumped b ON b.name = l.channel
    ), stored AS (
        INSERT INTO events (channel, "offset", type, data, time)
            SELECT p.channel, p."offset", p.type, p.data, clock_timestamp() FROM placed p ORDER BY p.item
            RETURNING channel, "offset", type, data, time
    )
    SELECT array_agg(p.item ORDER BY p.item), array_agg(s."offset" ORDER BY p.item),
           array_agg(event_json(s.channel, s."offset", s.type, s.data, s.time) ORDER BY p.item),
           array_agg(s.channel ORDER BY p.item)
        INTO items, offsets, jsons, channels_of
        FROM stored s JOIN placed p ON p.channel = s.channel AND p."offset" = s."offset";
    -- NOTIFY refuses payloads of 8000 bytes and more: large events are announced, then read.
    FOR k IN 1 .. coalesce(array_length(items, 1), 0) LOOP
        PERFORM pg_notify(current_schema() || '_events', CASE WHEN octet_length(jsons[k]) <= 7900 THEN jsons[k]
            ELSE '{"channel":"' || channels_of[k] || '","offset":' || offsets[k] || ',"large":true}' END);
    END LOOP;
    RETURN QUERY SELECT u.i, u.o, u.j FROM unnest(items, offsets, jsons) AS u (i, o, j);
END
$$;

CREATE FUNCTION store_event(p_channel text, p_type text, p_data text, OUT stored_offset bigint, OUT stored_json text)
LANGUAGE plpgsql AS $$
BEGIN
    SELECT s.stored_offset, s.stored_json INTO stored_offset, stored_json
        FROM store_events(ARRAY[p_channel], ARRAY[p_type], ARRAY[p_data]) s;
END
$$;

-- publish(channel, type, data): for applications, inside their own transaction.
-- json keeps the text as given (\u0000 included); raw newlines can only be whitespace
-- in valid JSON and become spaces, so an event stays one line on every transport.
-- The text overload takes untyped literals and parameters, which would otherwise be
-- ambiguous between json and jsonb; it parses them as JSON.
CREATE FUNCTION publish(channel text, type text, data json) RETURNS bigint
LANGUAGE sql VOLATILE SECURITY DEFINER SET search_path FROM CURRENT AS $$
    SELECT stored_offset FROM store_event(channel, type, translate(data::text, E'\n\r\t', '   '))
$$;

CREATE FUNCTION publish(channel text, type text, data jsonb) RETURNS bigint
LANGUAGE sql VOLATILE SECURITY DEFINER SET search_path FROM CURRENT AS $$
    SELECT stored_offset FROM store_event(channel, type, data::text)
$$;

CREATE FUNCTION publish(channel text, type text, data text) RETURNS bigint
LANGUAGE sql VOLATILE SECURITY DEFINER SET search_path FROM CURRENT AS $$
    SELECT stored_offset FROM store_event(channel, type, translate(data::json::text, E'\n\r\t', '   '))
$$;

-- For row triggers: EXECUTE FUNCTION herald.publish_row_changes('orders:{id}').
-- {column} is replaced from the new row (the old one for DELETE); the type is
-- <table>.insert|update|delete; data is {"new": row or null, "old": row or null}.
CREATE FUNCTION publish_row_changes() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
DECLARE
    source jsonb;
    channel text;
    placeholder text[];
BEGIN
    IF TG_LEVEL <> 'ROW' OR TG_WHEN <> 'AFTER' THEN
        RAISE EXCEPTION USING ERRCODE = 'trigger_protocol_violated',
            MESSAGE = 'herald.publish_row_changes: use it in an AFTER ... FOR EACH ROW trigger';
    END IF;
    IF TG_NARGS <> 1 THEN
        RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
            MESSAGE = 'herald.publish_row_changes: channel expected, one argument like ''orders:{id}''';
    END IF;
    IF TG_OP = 'DELETE' THEN
        source := to_jsonb(OLD);
    ELSE
        source := to_jsonb(NEW);
    END IF;
    channel := TG_ARGV[0];
    FOR placeholder IN SELECT regexp_matches(TG_ARGV[0], '\{([^{}]*)\}', 'g') LOOP
        IF NOT source ? placeholder[1] OR source ->> placeholder[1] IS NULL THEN
            RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
                MESSAGE = format('herald.publish_row_changes: channel %L needs column %L, which is missing or NULL in %I',
                                 TG_ARGV[0], placeholder[1], TG_TABLE_NAME);
        END IF;
        channel := replace(channel, '{' || placeholder[1] || '}', source ->> placeholder[1]);
    END LOOP;
    PERFORM store_event(
        channel,
        TG_TABLE_NAME || '.' || lower(TG_OP),
        json_build_object(
            'new', CASE WHEN TG_OP <> 'DELETE' THEN to_json(NEW) END,
            'old', CASE WHEN TG_OP <> 'INSERT' THEN to_json(OLD) END
        )::text
    );
    RETURN NULL;
END
$$;

-- Herald's own publishes: many items, one statement, one commit (group commit, batch
-- endpoints). Items of one request are stored all or none (a failing item fails the
-- statement; the caller retries the other requests without it). Channel rows are locked
-- in name order, so two batches never deadlock. With p_skip_locked, a request touching a
-- channel that an open transaction holds comes back 'busy' instead of holding up the
-- rest; the caller then publishes it alone, waiting at most p_wait_ms. An idempotency
-- key seen within 24 h answers the first event ('replay'), or 'conflict' for another body.
--
-- Two workers publishing on one channel: each flight found the channel locked by the
-- other's for the length of a commit, and sent its requests down the one-by-one path
-- (measured: 2 workers stored a quarter of what one did on one channel). A flight now
-- waits up to 100 ms for all its channels before it leaves the held ones out.
CREATE FUNCTION publish_batch(
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

-- <schema>_publisher: may call publish() and publish_row_changes(), nothing else here.
-- Roles belong to the cluster, not the database: another database's Herald may have made
-- it already (and may be making it right now).
DO $$
DECLARE
    schema_name text := current_schema();
    role_name text := current_schema() || '_publisher';
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = role_name) THEN
        BEGIN
            EXECUTE format('CREATE ROLE %I NOLOGIN', role_name);
        EXCEPTION
            WHEN duplicate_object OR unique_violation THEN
                NULL;
            WHEN insufficient_privilege THEN
                RAISE EXCEPTION USING ERRCODE = 'insufficient_privilege',
                    MESSAGE = format('Herald needs the role %I and may not create it', role_name),
                    HINT = format('As a superuser: CREATE ROLE %I NOLOGIN; or give Herald''s user CREATEROLE', role_name);
        END;
    END IF;
    EXECUTE format('REVOKE ALL ON ALL TABLES IN SCHEMA %I FROM PUBLIC', schema_name);
    EXECUTE format('REVOKE ALL ON ALL SEQUENCES IN SCHEMA %I FROM PUBLIC', schema_name);
    EXECUTE format('REVOKE EXECUTE ON ALL FUNCTIONS IN SCHEMA %I FROM PUBLIC', schema_name);
    EXECUTE format('GRANT USAGE ON SCHEMA %I TO %I', schema_name, role_name);
    EXECUTE format('GRANT EXECUTE ON FUNCTION publish(text, text, json), publish(text, text, jsonb), '
                   'publish(text, text, text), publish_row_changes() TO %I', role_name);
END
$$;
