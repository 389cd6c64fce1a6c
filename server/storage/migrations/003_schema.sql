-- Herald's tables move from public into their own schema (database.schema, the first
-- entry of the search_path the migration runner sets), so Herald can share an
-- application's database. ALTER TABLE ... SET SCHEMA keeps every row, index, constraint
-- and owned sequence (users.id goes on counting). A fresh install made these tables in
-- the schema already; a table of the same name in public is then the application's own
-- and stays where it is.
DO $$
DECLARE
    target text := current_schema();
    name text;
BEGIN
    IF target IS NULL OR target = 'public' THEN
        RETURN;
    END IF;
    FOREACH name IN ARRAY ARRAY['users', 'sessions', 'channels', 'events', 'idempotency_keys', 'subscriber_counts'] LOOP
        IF to_regclass(format('public.%I', name)) IS NOT NULL
           AND to_regclass(format('%I.%I', target, name)) IS NULL THEN
            EXECUTE format('ALTER TABLE public.%I SET SCHEMA %I', name, target);
        END IF;
    END LOOP;
END
$$;
