-- Tollgate schema. Applied on every start; every statement is idempotent, so applying
-- it twice is harmless. `schema_version` records which version a database has reached,
-- so later changes can be written as guarded migrations below the base.

SELECT pg_advisory_xact_lock(7305100001);  -- two processes starting together apply it once

CREATE TABLE IF NOT EXISTS schema_version (
    version    integer     PRIMARY KEY,
    applied_at timestamptz NOT NULL DEFAULT now()
);

-- The event log. `position` is dense and follows commit order (see service/eventlog/__init__.py),
-- `(stream_id, version)` makes the schema itself refuse a concurrent write to a stream,
-- and `hash` chains every event to the one before it (tamper evidence).
CREATE TABLE IF NOT EXISTS events (
    position       bigint      PRIMARY KEY CHECK (position > 0),
    stream_id      text        NOT NULL,
    version        integer     NOT NULL CHECK (version > 0),
    type           text        NOT NULL,
    schema_version smallint    NOT NULL DEFAULT 1,
    company_id     text,
    payload        json        NOT NULL,  -- json, not jsonb: the exact bytes that were hashed
    metadata       json        NOT NULL,
    recorded_at    timestamptz NOT NULL,
    hash           bytea       NOT NULL,
    CONSTRAINT events_stream_version UNIQUE (stream_id, version)
);
-- Only when missing: CREATE INDEX takes a lock every append's conflicts with, even when
-- the index exists (see the triggers below).
DO $$
BEGIN
    IF to_regclass('events_company_position') IS NULL THEN
        CREATE INDEX IF NOT EXISTS events_company_position ON events (company_id, position)
            WHERE company_id IS NOT NULL;
    END IF;
END $$;
-- When the row was written, on the database's clock (`recorded_at` is the writing host's,
-- and the hash covers it): how long an event has waited for a projection is measured from
-- here, so one host's clock set wrong cannot make every host's /readyz refuse. Not in the
-- hash, nor in what the log's reads return: an operational stamp. Added without a default
-- first (no row rewritten: a log written before keeps NULL there, and its age falls back
-- to `recorded_at`), then the default for new rows. Only when missing: either statement
-- takes the table's ACCESS EXCLUSIVE lock, which waits for every reader of the log and
-- holds every append and read back meanwhile, and this file is applied again whenever
-- its text changes.
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_attribute
                   WHERE attrelid = 'events'::regclass AND attname = 'appended_at'
                     AND NOT attisdropped AND atthasdef) THEN
        ALTER TABLE events ADD COLUMN IF NOT EXISTS appended_at timestamptz;
        ALTER TABLE events ALTER COLUMN appended_at SET DEFAULT clock_timestamp();
    END IF;
END $$;

-- The writers' lock: `events_append` takes this table in EXCLUSIVE mode, which conflicts
-- with itself, not with readers. Not `events` itself in that mode, which also conflicts with
-- the SHARE UPDATE EXCLUSIVE lock of VACUUM, ANALYZE and CREATE INDEX CONCURRENTLY: every
-- autovacuum of the log held every append for as long as it ran (an ANALYZE of a
-- 200,000-event log, 300 ms), and an anti-wraparound vacuum, which PostgreSQL does not
-- cancel for a waiting lock, would have held them for the whole table. This table is never
-- written, so autovacuum has nothing to do in it, and only a role that may update it can
-- take the lock (an advisory lock could be taken by any session of the database).
CREATE TABLE IF NOT EXISTS events_writer ();

-- The log is append-only: an UPDATE, DELETE or TRUNCATE by the application is refused.
-- (A superuser can still disable the trigger; the hash chain is what catches that.)
CREATE OR REPLACE FUNCTION events_refuse_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'the event log is append-only (% refused)', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END $$;

-- Created when missing, enabled again when found disabled, not dropped and created again:
-- DROP TRIGGER takes the table's ACCESS EXCLUSIVE lock, and CREATE TRIGGER (like ENABLE)
-- one that every append's conflicts with, and this file is applied again whenever its
-- text changes (a new version's first start, while the previous version's processes
-- append and a report may read the log).
DO $$
DECLARE
    enabled "char";
BEGIN
    SELECT tgenabled INTO enabled FROM pg_trigger
    WHERE tgrelid = 'events'::regclass AND tgname = 'events_append_only';
    IF NOT FOUND THEN
        CREATE TRIGGER events_append_only BEFORE UPDATE OR DELETE ON events
            FOR EACH ROW EXECUTE FUNCTION events_refuse_change();
    ELSIF enabled = 'D' THEN
        ALTER TABLE events ENABLE TRIGGER events_append_only;
    END IF;
    SELECT tgenabled INTO enabled FROM pg_trigger
    WHERE tgrelid = 'events'::regclass AND tgname = 'events_no_truncate';
    IF NOT FOUND THEN
        CREATE TRIGGER events_no_truncate BEFORE TRUNCATE ON events
            FOR EACH STATEMENT EXECUTE FUNCTION events_refuse_change();
    ELSIF enabled = 'D' THEN
        ALTER TABLE events ENABLE TRIGGER events_no_truncate;
    END IF;
END $$;

-- Appends one batch in one statement. Under the lock that serialises writers (so positions
-- are handed out in commit order), for each append in order: its conditions and expected
-- version are checked against the log and the appends before it, then its events get the
-- next positions and versions, and their hashes are chained from the head's. No writer has
-- to know the head, so writers in any number of processes each commit a batch in one round
-- trip, and the lock is held for this statement and its commit only.
--
-- The appends, in order: p_streams, p_expected (NULL: any version), p_counts (how many
-- events each has) and p_slots (each distinct stream of the batch, its conditions'
-- included, numbered from 1: where its version is kept while the batch is checked). Their
-- conditions: p_condition_of (the append's index, ascending), p_condition_slots,
-- p_condition_streams and p_condition_versions. Every append's events in order: p_event_of
-- (the append's index), p_digests (each event's content digest, 32 bytes an event, one
-- after the other: SHA-256 of `[stream,"type",schema_version,company_id,payload,metadata,
-- "recorded_at"]`, see service/eventlog/chain.py), p_types, p_schema_versions, p_companies,
-- p_payloads and p_metadata (JSON text, stored as given: the bytes the digest covers).
-- The writer computes the digests before the call, outside the lock: under it, an event's
-- link hashes 76 bytes (the previous hash, the position and version it gets here, the
-- digest) instead of all it holds, and its payload and metadata travel once.
-- p_probe_new false: a stream expected at version 0 and not seen before in the batch is new
-- without a look-up (the (stream_id, version) key refuses it if it exists; the writer then
-- calls again with true, and every stream is looked up).
-- Returns a JSON array, per append: its first position, or [stream, expected, actual] for
-- the version that did not match (that append alone is not written).
CREATE OR REPLACE FUNCTION events_append_batch(
    p_streams text[], p_expected integer[], p_counts integer[], p_slots integer[],
    p_condition_of integer[], p_condition_slots integer[], p_condition_streams text[],
    p_condition_versions integer[], p_event_of integer[], p_digests bytea, p_types text[],
    p_schema_versions smallint[], p_companies text[], p_payloads text[], p_metadata text[],
    p_recorded timestamptz, p_probe_new boolean)
RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    -- Validated before the lock is taken: less time holding it.
    payloads json[] := p_payloads::json[];
    metadata json[] := p_metadata::json[];
    head_position bigint;
    head_hash bytea;
    pos bigint;
    previous bytea;
    versions integer[] := '{}';  -- per slot: the stream's version (NULL: not looked up yet)
    first_positions bigint[];  -- per append; NULL: not written
    first_versions integer[];
    first_events integer[];  -- per append: the index of its first event
    hashes bytea[];  -- per event
    results text[] := '{}';
    -- The batch itself goes out with the commit, for the processes that keep the log in
    -- memory: they apply it from the notification instead of reading it back (a query and
    -- a round trip per commit of any other process). In pieces that each fit in a
    -- notification (8000 bytes): `first last [[position, version, "type", schema_version,
    -- payload], ...]`, as their lean reads get it; an event too large for one ends the
    -- announcement, and the rest is read as before.
    -- Not while the notification queue is filling: the server keeps every notification
    -- until the slowest listener of any database has read it (a process frozen, or a
    -- session listening inside a transaction left open), and once it is full (8 GB) every
    -- commit that notifies fails, and with it every append. Announced, an append takes
    -- about 512 bytes of it (16.8 million appends fill it: 37 minutes at 7,500 a second);
    -- past `tollgate.announce_below` (a fraction of the queue, 0.05 unless set to a plain
    -- number from 0 to 1: a mistyped setting must not fail the appends) only the head
    -- goes out, a few dozen bytes a commit, and the other processes read the events from
    -- the table.
    announce_below text := coalesce(current_setting('tollgate.announce_below', true), '');
    announcing boolean := pg_notification_queue_usage() < CASE  -- CASE: in this order
        WHEN announce_below !~ '^(0|1|0?\.[0-9]{1,20}|[0-9]\.?[0-9]{0,20}[eE]-[0-9]{1,2})$'
        THEN 0.05 WHEN announce_below::float8 > 1 THEN 0.05 ELSE announce_below::float8 END;
    piece text;
    piece_first bigint := 0;
    item text;
    conflict text;
    s text;
    c integer := 1;  -- the next condition
    i integer := 0;  -- the events of the appends before this one
    j integer;
    v integer;
BEGIN
    IF octet_length(p_digests) IS DISTINCT FROM 32 * cardinality(p_event_of) THEN
        RAISE EXCEPTION 'p_digests holds % bytes for % events', octet_length(p_digests),
            cardinality(p_event_of) USING ERRCODE = 'invalid_parameter_value';
    END IF;
    -- The writers' lock (events_writer, above), held until the commit is visible. First
    -- ROW EXCLUSIVE on events, which the INSERT takes anyway: a call of the body this one
    -- replaced (which locked events itself, in EXCLUSIVE mode), still running while the
    -- schema is applied, and this one exclude each other.
    LOCK TABLE events IN ROW EXCLUSIVE MODE;
    LOCK TABLE events_writer IN EXCLUSIVE MODE;
    SELECT e.position, e.hash INTO head_position, head_hash
    FROM events e ORDER BY e.position DESC LIMIT 1;
    pos := coalesce(head_position, 0);
    previous := coalesce(head_hash, decode(repeat('00', 32), 'hex'));

    FOR n IN 1 .. cardinality(p_streams) LOOP
        conflict := NULL;
        WHILE c <= cardinality(p_condition_of) AND p_condition_of[c] = n LOOP
            IF conflict IS NULL THEN
                s := p_condition_streams[c];
                j := p_condition_slots[c];
                IF versions[j] IS NULL THEN
                    SELECT coalesce(max(e.version), 0) INTO v FROM events e WHERE e.stream_id = s;
                    versions[j] := v;
                END IF;
                IF versions[j] <> p_condition_versions[c] THEN
                    conflict := concat('[', to_json(s), ',', p_condition_versions[c], ',',
                                       versions[j], ']');
                END IF;
            END IF;
            c := c + 1;
        END LOOP;
        s := p_streams[n];
        j := p_slots[n];
        IF conflict IS NULL THEN
            IF versions[j] IS NULL THEN
                IF p_expected[n] = 0 AND NOT p_probe_new THEN
                    v := 0;
                ELSE
                    SELECT coalesce(max(e.version), 0) INTO v FROM events e WHERE e.stream_id = s;
                END IF;
                versions[j] := v;
            END IF;
            IF p_expected[n] IS NOT NULL AND versions[j] <> p_expected[n] THEN
                conflict := concat('[', to_json(s), ',', p_expected[n], ',', versions[j], ']');
            END IF;
        END IF;
        IF conflict IS NOT NULL THEN
            results := results || conflict;
            i := i + p_counts[n];
            CONTINUE;
        END IF;
        first_positions[n] := pos + 1;
        first_versions[n] := versions[j] + 1;
        first_events[n] := i + 1;
        results := results || (pos + 1)::text;
        -- event k of this append: position pos + k - i, version versions[j] + k - i
        FOR k IN i + 1 .. i + p_counts[n] LOOP
            previous := sha256(previous || int8send(pos + k - i) || int4send(versions[j] + k - i)
                               || substring(p_digests FROM k * 32 - 31 FOR 32));
            hashes[k] := previous;
            IF announcing THEN
                item := concat('[', pos + k - i, ',', versions[j] + k - i, ',',
                               to_json(p_types[k]), ',', p_schema_versions[k], ',',
                               p_payloads[k], ']');
                IF piece_first > 0 AND octet_length(piece) + octet_length(item) >= 7900 THEN
                    PERFORM pg_notify('tollgate_batches',
                                      concat(piece_first, ' ', pos + k - i - 1, ' [', piece, ']'));
                    piece_first := 0;
                END IF;
                IF piece_first > 0 THEN
                    piece := piece || ',' || item;
                ELSIF octet_length(item) < 7900 THEN
                    piece_first := pos + k - i;
                    piece := item;
                ELSE
                    announcing := false;
                END IF;
            END IF;
        END LOOP;
        pos := pos + p_counts[n];
        versions[j] := versions[j] + p_counts[n];
        i := i + p_counts[n];
    END LOOP;

    IF pos > coalesce(head_position, 0) THEN
        INSERT INTO events
        SELECT first_positions[e.n] + e.k - first_events[e.n], p_streams[e.n],
               first_versions[e.n] + e.k - first_events[e.n], e.type, e.schema_version,
               e.company_id, e.payload, e.metadata, p_recorded, hashes[e.k]
        FROM unnest(p_event_of, p_types, p_schema_versions, p_companies, payloads, metadata)
             WITH ORDINALITY AS e(n, type, schema_version, company_id, payload, metadata, k)
        WHERE first_positions[e.n] IS NOT NULL;
        -- Before the head's notification: a listener that applied the pieces has nothing
        -- to read when it arrives.
        IF announcing AND piece_first > 0 THEN
            PERFORM pg_notify('tollgate_batches', concat(piece_first, ' ', pos, ' [', piece, ']'));
        END IF;
        PERFORM pg_notify('tollgate_events', pos::text);
    END IF;
    RETURN '[' || array_to_string(results, ',') || ']';
END $$;

-- The same batch, each array as one text (service/eventlog/appends.py): a text array's
-- elements between U+001E, a company's NULL as U+001F (JSON escapes both, and the writer
-- sends arrays instead when a raw text holds one), an integer array as its literal. The
-- client encodes one text at once, not an array element by element.
CREATE OR REPLACE FUNCTION events_append_batch_packed(
    p_streams text, p_expected text, p_counts text, p_slots text, p_condition_of text,
    p_condition_slots text, p_condition_streams text, p_condition_versions text,
    p_event_of text, p_digests bytea, p_types text, p_schema_versions text,
    p_companies text, p_payloads text, p_metadata text, p_recorded timestamptz,
    p_probe_new boolean)
RETURNS text
LANGUAGE sql AS $$
    SELECT events_append_batch(
        string_to_array(p_streams, E'\x1e'), p_expected::integer[], p_counts::integer[],
        p_slots::integer[], p_condition_of::integer[], p_condition_slots::integer[],
        string_to_array(p_condition_streams, E'\x1e'), p_condition_versions::integer[],
        p_event_of::integer[], p_digests, string_to_array(p_types, E'\x1e'),
        p_schema_versions::smallint[], string_to_array(p_companies, E'\x1e', E'\x1f'),
        string_to_array(p_payloads, E'\x1e'), string_to_array(p_metadata, E'\x1e'),
        p_recorded, p_probe_new)
$$;

-- What processes of the previous version call while hosts are rolled one at a time: the
-- batch with what the hash covers after each event's version (p_tails:
-- `,"type",schema_version,company_id,payload,metadata,"recorded_at"]`) and each append's
-- stream as JSON, from which the digests are computed here (`events_tail_digests`). Their
-- events are chained as the new version's are.
CREATE OR REPLACE FUNCTION events_tail_digests(
    p_stream_json text[], p_event_of integer[], p_tails text[])
RETURNS bytea
LANGUAGE sql AS $$
    SELECT string_agg(sha256(convert_to(concat('[', p_stream_json[e.n], e.tail), 'UTF8')),
                      ''::bytea ORDER BY e.k)
    FROM unnest(p_event_of, p_tails) WITH ORDINALITY AS e(n, tail, k)
$$;

CREATE OR REPLACE FUNCTION events_append(
    p_streams text[], p_stream_json text[], p_expected integer[], p_counts integer[],
    p_slots integer[], p_condition_of integer[], p_condition_slots integer[],
    p_condition_streams text[], p_condition_versions integer[],
    p_event_of integer[], p_tails text[], p_types text[], p_schema_versions smallint[],
    p_companies text[], p_payloads text[], p_metadata text[], p_recorded timestamptz,
    p_probe_new boolean)
RETURNS text
LANGUAGE sql AS $$
    SELECT events_append_batch(
        p_streams, p_expected, p_counts, p_slots, p_condition_of, p_condition_slots,
        p_condition_streams, p_condition_versions, p_event_of,
        events_tail_digests(p_stream_json, p_event_of, p_tails), p_types, p_schema_versions,
        p_companies, p_payloads, p_metadata, p_recorded, p_probe_new)
$$;

CREATE OR REPLACE FUNCTION events_append_packed(
    p_streams text, p_stream_json text, p_expected text, p_counts text,
    p_slots text, p_condition_of text, p_condition_slots text,
    p_condition_streams text, p_condition_versions text,
    p_event_of text, p_tails text, p_types text, p_schema_versions text,
    p_companies text, p_payloads text, p_metadata text, p_recorded timestamptz,
    p_probe_new boolean)
RETURNS text
LANGUAGE sql AS $$
    SELECT events_append_batch_packed(
        p_streams, p_expected, p_counts, p_slots, p_condition_of, p_condition_slots,
        p_condition_streams, p_condition_versions, p_event_of,
        events_tail_digests(string_to_array(p_stream_json, E'\x1e'), p_event_of::integer[],
                            string_to_array(p_tails, E'\x1e')),
        p_types, p_schema_versions, p_companies, p_payloads, p_metadata, p_recorded,
        p_probe_new)
$$;

-- What processes of two versions back call: the same batch without slots, each stream
-- numbered here.
CREATE OR REPLACE FUNCTION events_append(
    p_streams text[], p_stream_json text[], p_expected integer[], p_counts integer[],
    p_condition_of integer[], p_condition_streams text[], p_condition_versions integer[],
    p_event_of integer[], p_tails text[], p_types text[], p_schema_versions smallint[],
    p_companies text[], p_payloads text[], p_metadata text[], p_recorded timestamptz,
    p_probe_new boolean)
RETURNS text
LANGUAGE sql AS $$
    SELECT events_append(
        p_streams, p_stream_json, p_expected, p_counts, slots.appends, p_condition_of,
        slots.conditions, p_condition_streams, p_condition_versions, p_event_of, p_tails,
        p_types, p_schema_versions, p_companies, p_payloads, p_metadata, p_recorded,
        p_probe_new)
    FROM (SELECT coalesce(array_agg(slot ORDER BY o) FILTER (WHERE kind = 1), '{}') AS appends,
                 coalesce(array_agg(slot ORDER BY o) FILTER (WHERE kind = 2), '{}') AS conditions
          FROM (SELECT kind, o, dense_rank() OVER (ORDER BY s)::integer AS slot
                FROM (SELECT 1 AS kind, o, s FROM unnest(p_streams) WITH ORDINALITY AS a(s, o)
                      UNION ALL
                      SELECT 2, o, s FROM unnest(p_condition_streams) WITH ORDINALITY AS c(s, o)
                     ) AS named) AS numbered) AS slots
$$;

-- Projection bookkeeping: one row per projection, written in the same transaction as the
-- projection's own rows.
CREATE TABLE IF NOT EXISTS projection_checkpoints (
    name       text        PRIMARY KEY,
    position   bigint      NOT NULL DEFAULT 0,
    updated_at timestamptz NOT NULL DEFAULT now()
);

-- What a checkpoint saw: the hash of the event at its position when it moved there (NULL
-- at 0, and until a checkpoint written before this column moves). A checkpoint moves on
-- only from the event it saw: a log whose tail was cut and written again (a restore under
-- running processes, a superuser's DELETE) has another event there, and what follows it
-- was never applied. The move is refused (data_corrupted), so the projection and the
-- notifier stop at it, and `/readyz` and `tollgate audit verify` name it, until the
-- projections are rebuilt (`SET LOCAL tollgate.rebuild = 'on'` in the rebuild's
-- transaction). Only when missing: ALTER TABLE and CREATE TRIGGER lock the table, and
-- this file is applied again whenever its text changes.
CREATE OR REPLACE FUNCTION projection_checkpoints_saw() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    there bytea;
BEGIN
    IF NEW.position = OLD.position THEN
        RETURN NEW;
    END IF;
    IF OLD.position_hash IS NOT NULL
       AND coalesce(current_setting('tollgate.rebuild', true), '') <> 'on' THEN
        SELECT hash INTO there FROM events WHERE position = OLD.position;
        IF there IS DISTINCT FROM OLD.position_hash THEN
            RAISE EXCEPTION 'the event log was rewritten at or before position %: the % '
                            'checkpoint saw another event there', OLD.position, OLD.name
                USING ERRCODE = 'data_corrupted',
                      HINT = 'tollgate audit verify; then tollgate projections rebuild';
        END IF;
    END IF;
    SELECT hash INTO NEW.position_hash FROM events WHERE position = NEW.position;
    RETURN NEW;
END $$;

DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_attribute
                   WHERE attrelid = 'projection_checkpoints'::regclass
                     AND attname = 'position_hash' AND NOT attisdropped) THEN
        ALTER TABLE projection_checkpoints ADD COLUMN IF NOT EXISTS position_hash bytea;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_trigger
                   WHERE tgrelid = 'projection_checkpoints'::regclass
                     AND tgname = 'projection_checkpoints_saw') THEN
        CREATE TRIGGER projection_checkpoints_saw BEFORE UPDATE ON projection_checkpoints
            FOR EACH ROW EXECUTE FUNCTION projection_checkpoints_saw();
    END IF;
END $$;

-- Read models (see projections/). Each is rebuilt from the log alone.
CREATE TABLE IF NOT EXISTS applications (
    client_id           text        PRIMARY KEY,
    company_id          text        NOT NULL,
    name                text        NOT NULL,
    grant_type          text        NOT NULL,
    redirect_uri        text,
    ip_allowlist        text[]      NOT NULL,
    permissions         text[]      NOT NULL,
    notification_emails text[]      NOT NULL,
    secret_version      integer     NOT NULL,
    created_at          timestamptz NOT NULL,
    updated_at          timestamptz NOT NULL,
    version             integer     NOT NULL
);
CREATE INDEX IF NOT EXISTS applications_company ON applications (company_id);

CREATE TABLE IF NOT EXISTS live_tokens (
    token_hash  bytea       PRIMARY KEY,
    family_id   text        NOT NULL,
    client_id   text        NOT NULL,
    company_id  text        NOT NULL,
    grant_type  text        NOT NULL,
    permissions text[]      NOT NULL,
    issued_at   timestamptz NOT NULL,
    expires_at  timestamptz
);
CREATE INDEX IF NOT EXISTS live_tokens_client ON live_tokens (client_id);
-- The families of more than one token (a user's grant and its refreshes), by a hash index:
-- only equality (`= ANY`, a revocation's families) is asked of it. A client_credentials
-- token is a family of its own, `fam_` and its hash in hex: the primary key finds it, and
-- it has no entry here (an entry cost 1.5-2.5 us of a row's 13, and 5 us of 25-30 just
-- after a checkpoint, at 2 million rows). As a btree of all the families, in earlier
-- versions, it was larger than the primary key; then a hash index of all of them. Both are
-- dropped once this one is built (the table is readable meanwhile).
CREATE INDEX IF NOT EXISTS live_tokens_family_shared ON live_tokens USING hash (family_id)
    WHERE family_id <> 'fam_' || encode(token_hash, 'hex');
DROP INDEX IF EXISTS live_tokens_family;
DROP INDEX IF EXISTS live_tokens_family_hash;
CREATE INDEX IF NOT EXISTS live_tokens_expiry ON live_tokens (expires_at) WHERE expires_at IS NOT NULL;

CREATE TABLE IF NOT EXISTS companies (
    company_id text        PRIMARY KEY,
    name       text        NOT NULL,
    created_at timestamptz NOT NULL
);

-- No password hashes here: the log has them, a dashboard has no use for them.
CREATE TABLE IF NOT EXISTS users (
    user_id    text        PRIMARY KEY,
    company_id text        NOT NULL,
    email      text        NOT NULL,
    role       text        NOT NULL,
    created_at timestamptz NOT NULL,
    removed_at timestamptz
);
CREATE INDEX IF NOT EXISTS users_company ON users (company_id);
-- No unique email: an address may have an account at several companies, one at each
-- (the log's per-company user streams keep it so).

-- A sign-in waiting for the person to choose a company (service/web/sessions.py): the
-- password matched the address's accounts at several. Only the digest of the choice's
-- random key (the browser holds the key); never the password. Single use, minutes of
-- life; expired rows are swept when a new one is written.
CREATE TABLE IF NOT EXISTS sign_in_choices (
    choice_hash text        PRIMARY KEY,
    user_ids    text[]      NOT NULL,
    versions    integer[]   NOT NULL,
    next_url    text        NOT NULL,
    expires_at  timestamptz NOT NULL
);
CREATE INDEX IF NOT EXISTS sign_in_choices_expiry ON sign_in_choices (expires_at);

CREATE TABLE IF NOT EXISTS admin_keys (
    key_id     text        PRIMARY KEY,
    company_id text        NOT NULL,
    label      text        NOT NULL,
    issued_by  text        NOT NULL,
    issued_at  timestamptz NOT NULL,
    revoked_at timestamptz
);
CREATE INDEX IF NOT EXISTS admin_keys_company ON admin_keys (company_id);

CREATE TABLE IF NOT EXISTS event_stats (
    day   date   NOT NULL,
    type  text   NOT NULL,
    count bigint NOT NULL,
    PRIMARY KEY (day, type)
);

-- Browser sessions (login for consent and the dashboard). Not events: operational state
-- that expires; the cookie's value is stored only as a SHA-256 digest.
CREATE TABLE IF NOT EXISTS web_sessions (
    session_hash text        PRIMARY KEY,
    user_id      text        NOT NULL,
    company_id   text        NOT NULL,
    csrf_hash    text        NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    expires_at   timestamptz NOT NULL
);
CREATE INDEX IF NOT EXISTS web_sessions_expiry ON web_sessions (expires_at);
-- The version of the user's password the session was opened with (the user's stream
-- version at UserAdded or UserPasswordChanged): a session opened with a password changed
-- since is worth nothing, even one opened a moment after the change, before this process
-- had it. NULL: a session from before the column.
ALTER TABLE web_sessions ADD COLUMN IF NOT EXISTS user_version integer;

INSERT INTO schema_version (version) VALUES (1) ON CONFLICT DO NOTHING;

-- Views for teams that build their own dashboards (Grafana and the like). Plain views over
-- the log and the read models: nothing is stored twice, `CREATE OR REPLACE` keeps them
-- idempotent, and a filter on `company_id` reaches the indexes underneath.

-- v_ip_violations: requests with a valid credential from outside its application's IP
-- allow list. One row per IpViolationDetected (`count` 1), and one per
-- IpViolationsCoalesced: the attempts after the first in a VIOLATION_WINDOW, counted
-- (`count`), from `first_at` to `last_at`, `coalesced` true: these are never mailed on their
-- own (the next email counts them). Sum `count` to count attempts. `company_id` is
-- the application's owner, `endpoint` is api, token, policy_check, revoke or introspect,
-- `token_revoked` says whether a token died. Columns are only ever added, at the end.
CREATE OR REPLACE VIEW v_ip_violations AS
SELECT e.position,
       e.recorded_at,
       e.company_id,
       e.payload ->> 'client_id' AS client_id,
       e.payload ->> 'ip' AS ip,
       e.payload ->> 'endpoint' AS endpoint,
       coalesce((e.payload ->> 'token_revoked')::boolean, false) AS token_revoked,
       CASE WHEN e.type = 'IpViolationsCoalesced' THEN (e.payload ->> 'count')::bigint
            ELSE 1 END AS count,
       CASE WHEN e.type = 'IpViolationsCoalesced'
            THEN to_timestamp((e.payload ->> 'first_at')::double precision)
            ELSE e.recorded_at END AS first_at,
       CASE WHEN e.type = 'IpViolationsCoalesced'
            THEN to_timestamp((e.payload ->> 'last_at')::double precision)
            ELSE e.recorded_at END AS last_at,
       e.type = 'IpViolationsCoalesced' AS coalesced
FROM events e
WHERE e.type IN ('IpViolationDetected', 'IpViolationsCoalesced');

-- v_live_tokens_per_application: every live application with the number of its access
-- tokens that are neither revoked nor expired (tokens granted by any company count toward
-- the application's owner); expired rows the sweeper has not removed yet are not counted.
CREATE OR REPLACE VIEW v_live_tokens_per_application AS
SELECT a.client_id,
       a.company_id,
       a.name,
       count(t.token_hash) AS live_tokens
FROM applications a
LEFT JOIN live_tokens t
       ON t.client_id = a.client_id AND (t.expires_at IS NULL OR t.expires_at > now())
GROUP BY a.client_id, a.company_id, a.name;

-- v_admin_changes: who changed which application, user, admin key or connection, when and
-- from where (service.history.CHANGE_TYPES lists the same types). Password hashes are
-- redacted: a low-entropy password could be guessed from one offline.
CREATE OR REPLACE VIEW v_admin_changes AS
SELECT e.position,
       e.recorded_at,
       e.company_id,
       e.type,
       e.metadata ->> 'actor' AS actor,
       e.metadata ->> 'client_ip' AS client_ip,
       e.metadata ->> 'request_id' AS request_id,
       jsonb_set(e.payload::jsonb, '{password_hash}', '"[redacted]"', false) - 'type' AS payload
FROM events e
WHERE e.company_id IS NOT NULL
  AND e.type IN ('ApplicationCreated', 'ApplicationRenamed', 'RedirectUriChanged',
                 'IpAllowlistChanged', 'PermissionsChanged', 'NotificationEmailsChanged',
                 'ClientSecretRotated', 'ApplicationDeleted', 'ApplicationTokensRevoked',
                 'CcTokenLimitChanged', 'TokenEndpointAuthMethodChanged', 'ClientKeyAdded',
                 'ClientKeyRemoved', 'DpopBoundAccessTokensChanged', 'UserAdded', 'UserRoleChanged',
                 'UserPasswordChanged', 'UserRemoved', 'AdminKeyIssued', 'AdminKeyRevoked',
                 'ConnectionGranted', 'ConnectionRevoked');

-- Users' lifecycle (removal, password change): every session of a user ends at once, by
-- deleting that user's rows.
CREATE INDEX IF NOT EXISTS web_sessions_user ON web_sessions (user_id);

-- Faults (readiness): /readyz writes a row here in a transaction it rolls back, so that
-- "ready" means a write would succeed now (not a read-only or recovering database).
CREATE TABLE IF NOT EXISTS readiness_probe (at timestamptz NOT NULL DEFAULT now());

-- Sign-in throttling (service/storage/throttle.py). Failed sign-ins per key, shared by
-- every process and host, so that `--workers N` or N hosts do not allow N times the
-- guesses. Not events: operational state that expires (rows whose window has passed are
-- pruned). A key is the lower-cased email and the caller's address (or `*`), never a
-- password.
CREATE TABLE IF NOT EXISTS sign_in_failures (
    key          text        PRIMARY KEY,
    max_failures integer     NOT NULL,
    failures     integer     NOT NULL,
    window_start timestamptz NOT NULL
);
CREATE INDEX IF NOT EXISTS sign_in_failures_window ON sign_in_failures (window_start);

-- Client authentication settings (projections/applications.py): an application's own
-- bound on its live client_credentials tokens (NULL: CC_TOKEN_LIMIT), how it
-- authenticates at the token endpoint (RFC 7591 token_endpoint_auth_method), and the key
-- ids of its public keys for private_key_jwt (the public keys themselves are in the log).
ALTER TABLE applications ADD COLUMN IF NOT EXISTS cc_token_limit integer;
ALTER TABLE applications ADD COLUMN IF NOT EXISTS token_endpoint_auth_method text NOT NULL
    DEFAULT 'client_secret_basic';
ALTER TABLE applications ADD COLUMN IF NOT EXISTS client_key_ids text[] NOT NULL DEFAULT '{}';

-- DPoP (RFC 9449 §5.2, projections/applications.py): whether every token request of the
-- application must carry a DPoP proof.
ALTER TABLE applications ADD COLUMN IF NOT EXISTS dpop_bound_access_tokens boolean NOT NULL
    DEFAULT false;

-- The digest of each schema.sql text applied (service/storage/database.py apply_schema): a
-- start whose text is here already applies nothing, so it takes no table lock.
CREATE TABLE IF NOT EXISTS schema_applied (
    digest     text        PRIMARY KEY,
    applied_at timestamptz NOT NULL DEFAULT now()
);

-- DPoP server nonces (RFC 9449 §8, service/storage/dpop_nonces.py), with DPOP_NONCE=required:
-- the nonces every process has handed out, so that each process accepts the others'. The
-- SHA-256 digest of each, never the nonce. Not events: operational state that expires
-- (expired rows are pruned when a process adds its next nonce).
CREATE TABLE IF NOT EXISTS dpop_nonces (
    digest     bytea       PRIMARY KEY,
    expires_at timestamptz NOT NULL
);
CREATE INDEX IF NOT EXISTS dpop_nonces_expiry ON dpop_nonces (expires_at);

-- Snapshots of the in-memory models (projections/snapshots.py): a process starts from the
-- newest one of its format whose event is still in the log with that hash, and applies
-- only the log after it. Written in parts (msgpack) by one process at a time; they hold
-- what the models hold (hashes, never a secret in clear). Not events: derived, and any of
-- them may be deleted at any time (a start then applies the whole log).
CREATE TABLE IF NOT EXISTS model_snapshots (
    format     text        NOT NULL,  -- a digest of the code that builds the models
    position   bigint      NOT NULL,
    part       integer     NOT NULL,
    parts      integer     NOT NULL,
    event_hash bytea       NOT NULL,  -- the hash of the event at `position`
    taken_at   timestamptz NOT NULL DEFAULT now(),
    data       bytea       NOT NULL,
    PRIMARY KEY (format, position, part)
);
-- Token hashes do not compress: stored as they are, without the attempt.
ALTER TABLE model_snapshots ALTER COLUMN data SET STORAGE EXTERNAL;
