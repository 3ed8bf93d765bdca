-- Accounts, refresh tokens and the hash-chained audit trail (dispatch/accounts.py, dispatch/audit.py).
-- Passwords are argon2id hashes and refresh tokens SHA-256 digests.  TOTP secrets must stay readable to check codes:
-- keep the database on an encrypted volume and its backups encrypted.
CREATE TABLE dispatch_accounts (
    username        text PRIMARY KEY,
    role            text NOT NULL,
    hospital_id     text,
    unit_id         text,
    password_hash   text NOT NULL,
    totp_secret     text,
    totp_last_step  integer NOT NULL DEFAULT -1,
    failed_logins   integer NOT NULL DEFAULT 0,
    locked_until    TEXT,
    disabled        INTEGER NOT NULL DEFAULT 0,
    created_at      TEXT NOT NULL,
    updated_at      TEXT
);

CREATE TABLE dispatch_refresh_tokens (
    token_hash  text PRIMARY KEY,
    username    text NOT NULL REFERENCES dispatch_accounts (username) ON DELETE CASCADE,
    family      text NOT NULL,
    created_at  TEXT NOT NULL,
    expires_at  TEXT NOT NULL,
    revoked_at  TEXT
);
CREATE INDEX dispatch_refresh_tokens_family_idx ON dispatch_refresh_tokens (family);

-- Append-only; "at" is the exact ISO 8601 text that was hashed.  Grant the service INSERT and SELECT only.
CREATE TABLE dispatch_audit (
    seq                integer PRIMARY KEY,
    at                 text NOT NULL,
    actor              text NOT NULL,
    role               text NOT NULL,
    actor_hospital_id  text,
    action             text NOT NULL,
    object_type        text,
    object_id          text,
    unit_id            text,
    alert_id           text,
    incident_id        text,
    hospital_id        text,
    client_addr        text,
    outcome            text NOT NULL,
    reported_by        text,
    detail             text NOT NULL,
    prev_hash          text NOT NULL,
    hash               text NOT NULL
);
CREATE INDEX dispatch_audit_unit_idx ON dispatch_audit (unit_id, seq);
CREATE INDEX dispatch_audit_alert_idx ON dispatch_audit (alert_id, seq);
CREATE INDEX dispatch_audit_incident_idx ON dispatch_audit (incident_id, seq);
CREATE INDEX dispatch_audit_actor_idx ON dispatch_audit (actor, seq);
