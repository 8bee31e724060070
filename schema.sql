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
CREATE INDEX IF NOT EXISTS events_company_position ON events (company_id, position)
    WHERE company_id IS NOT NULL;

-- The log is append-only: an UPDATE, DELETE or TRUNCATE by the application is refused.
-- (A superuser can still disable the trigger; the hash chain is what catches that.)
CREATE OR REPLACE FUNCTION events_refuse_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'the event log is append-only (% refused)', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END $$;

DROP TRIGGER IF EXISTS events_append_only ON events;
CREATE TRIGGER events_append_only BEFORE UPDATE OR DELETE ON events
    FOR EACH ROW EXECUTE FUNCTION events_refuse_change();
DROP TRIGGER IF EXISTS events_no_truncate ON events;
CREATE TRIGGER events_no_truncate BEFORE TRUNCATE ON events
    FOR EACH STATEMENT EXECUTE FUNCTION events_refuse_change();

-- Opens an append: takes the table lock that serialises writers (so positions are handed
-- out in commit order), and returns the head of the chain and the current version of each
-- stream the append touches, in the order given.
CREATE OR REPLACE FUNCTION events_begin_append(p_streams text[])
RETURNS TABLE (head_position bigint, head_hash bytea, versions integer[])
LANGUAGE plpgsql AS $$
BEGIN
    LOCK TABLE events IN EXCLUSIVE MODE;
    RETURN QUERY
    SELECT h.position, h.hash,
           ARRAY(SELECT coalesce((SELECT max(e.version) FROM events e WHERE e.stream_id = s.id), 0)
                 FROM unnest(p_streams) WITH ORDINALITY AS s(id, n) ORDER BY s.n)
    FROM (SELECT 1) AS one
    LEFT JOIN LATERAL (SELECT e.position, e.hash FROM events e
                       ORDER BY e.position DESC LIMIT 1) AS h ON true;
END $$;

-- A batch planned by the writer (positions, versions and hashes computed under the lock),
-- as rows of the table. The rows come as one JSON array: one parameter to encode instead
-- of ten arrays. `json` operators parse the whole text on every call, so it is parsed once,
-- here, and nothing else looks into it.
CREATE OR REPLACE FUNCTION events_rows(p_rows json, p_recorded timestamptz)
RETURNS events[]
LANGUAGE sql STABLE AS $$
    SELECT ARRAY(
        SELECT ROW(r.position, r.stream_id, r.version, r.type, r.schema_version, r.company_id,
                   r.payload, r.metadata, p_recorded, decode(r.hash, 'hex'))::events
        FROM json_to_recordset(p_rows) AS r(position bigint, stream_id text, version integer,
                                             type text, schema_version smallint,
                                             company_id text, payload json, metadata json,
                                             hash text))
$$;

-- Writes a planned batch and wakes the listeners.
CREATE OR REPLACE FUNCTION events_write(p_batch events[])
RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    IF cardinality(p_batch) > 0 THEN
        INSERT INTO events SELECT * FROM unnest(p_batch);
        PERFORM pg_notify('tollgate_events', p_batch[cardinality(p_batch)].position::text);
    END IF;
END $$;

-- The locked path: inside the transaction opened by events_begin_append.
CREATE OR REPLACE FUNCTION events_insert(p_rows json, p_recorded timestamptz)
RETURNS void
LANGUAGE sql AS $$
    SELECT events_write(events_rows(p_rows, p_recorded))
$$;

-- The common case in one round trip: this process appended last, so it already knows the
-- head of the chain and assumes each stream is at its expected version. Under the same lock,
-- if both still hold, the rows go in and true comes back; if not, nothing is written and
-- the writer falls back to events_begin_append in an explicit transaction.
-- `p_exact` lists the streams that must be at exactly a version (conditions, and appends to
-- existing streams); an append to a new stream needs no look-up: the (stream_id, version)
-- key refuses it if the stream exists.
CREATE OR REPLACE FUNCTION events_append_if_head(
    p_head bigint, p_head_hash bytea, p_exact json, p_rows json, p_recorded timestamptz)
RETURNS boolean
LANGUAGE plpgsql AS $$
DECLARE
    head_position bigint;
    head_hash bytea;
    -- Parsed before the lock is taken: less time holding it.
    batch events[] := events_rows(p_rows, p_recorded);
BEGIN
    LOCK TABLE events IN EXCLUSIVE MODE;
    SELECT e.position, e.hash INTO head_position, head_hash
    FROM events e ORDER BY e.position DESC LIMIT 1;
    IF coalesce(head_position, 0) <> p_head OR head_hash IS DISTINCT FROM p_head_hash THEN
        RETURN false;
    END IF;
    IF EXISTS (SELECT 1 FROM json_each_text(p_exact) AS s(id, v)
               WHERE coalesce((SELECT max(e.version) FROM events e WHERE e.stream_id = s.id), 0)
                     <> s.v::integer) THEN
        RETURN false;
    END IF;
    -- A new stream that exists after all raises unique_violation: the writer takes that
    -- as "false" (an EXCEPTION block here would cost a subtransaction per call).
    PERFORM events_write(batch);
    RETURN true;
END $$;

-- Projection bookkeeping: one row per projection, written in the same transaction as the
-- projection's own rows.
CREATE TABLE IF NOT EXISTS projection_checkpoints (
    name       text        PRIMARY KEY,
    position   bigint      NOT NULL DEFAULT 0,
    updated_at timestamptz NOT NULL DEFAULT now()
);

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
CREATE INDEX IF NOT EXISTS live_tokens_family ON live_tokens (family_id);
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
