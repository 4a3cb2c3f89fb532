-- postfach embedded store, schema version 1: domains, accounts, aliases, mailboxes, messages, blobs.
-- Times are integer microseconds since 1970-01-01 UTC. Flags are one space-separated string, with
-- \Seen and \Deleted mirrored into columns for STATUS/EXPUNGE.

CREATE TABLE counter (
    name  TEXT PRIMARY KEY,
    value INTEGER NOT NULL
) WITHOUT ROWID;

CREATE TABLE domain (
    name        TEXT PRIMARY KEY,
    created     INTEGER NOT NULL,
    quota_bytes INTEGER
) WITHOUT ROWID;

CREATE TABLE account (
    id             INTEGER PRIMARY KEY AUTOINCREMENT,
    address        TEXT NOT NULL UNIQUE,
    domain         TEXT NOT NULL REFERENCES domain(name),
    password_hash  TEXT NOT NULL,
    quota_bytes    INTEGER,
    quota_messages INTEGER,
    used_bytes     INTEGER NOT NULL DEFAULT 0,
    used_messages  INTEGER NOT NULL DEFAULT 0,
    created        INTEGER NOT NULL,
    disabled       INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX account_domain ON account(domain);

CREATE TABLE alias (
    source TEXT NOT NULL,  -- "local@domain" or "@domain" (catch-all)
    target TEXT NOT NULL,
    domain TEXT NOT NULL,
    PRIMARY KEY (source, target)
) WITHOUT ROWID;
CREATE INDEX alias_domain ON alias(domain);

CREATE TABLE mailbox (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    account_id    INTEGER NOT NULL REFERENCES account(id),
    name          TEXT NOT NULL,
    special_use   TEXT,
    uidvalidity   INTEGER NOT NULL,
    uidnext       INTEGER NOT NULL DEFAULT 1,
    highestmodseq INTEGER NOT NULL DEFAULT 1,
    recent_uid    INTEGER NOT NULL DEFAULT 1,  -- first UID still \Recent for the next claimer
    UNIQUE (account_id, name)
);

CREATE TABLE subscription (
    account_id INTEGER NOT NULL REFERENCES account(id),
    name       TEXT NOT NULL,
    PRIMARY KEY (account_id, name)
) WITHOUT ROWID;

CREATE TABLE blob (
    id       TEXT PRIMARY KEY,      -- hex sha256 of the bytes; file blobs/ab/cd/<id>
    size     INTEGER NOT NULL,
    refcount INTEGER NOT NULL,      -- message rows + queue rows referring to it
    info     BLOB                   -- postfach.mail.MessageInfo.to_json(), made once at ingest
) WITHOUT ROWID;

CREATE TABLE message (
    mailbox_id   INTEGER NOT NULL REFERENCES mailbox(id),
    uid          INTEGER NOT NULL,
    blob_id      TEXT NOT NULL REFERENCES blob(id),
    size         INTEGER NOT NULL,
    internaldate INTEGER NOT NULL,
    savedate     INTEGER NOT NULL,
    flags        TEXT NOT NULL DEFAULT '',
    seen         INTEGER NOT NULL DEFAULT 0,
    deleted      INTEGER NOT NULL DEFAULT 0,
    modseq       INTEGER NOT NULL,
    PRIMARY KEY (mailbox_id, uid)
) WITHOUT ROWID;
CREATE INDEX message_modseq ON message(mailbox_id, modseq);
CREATE INDEX message_blob ON message(blob_id);

CREATE TABLE expunged (
    mailbox_id INTEGER NOT NULL REFERENCES mailbox(id),
    uid        INTEGER NOT NULL,
    modseq     INTEGER NOT NULL,
    PRIMARY KEY (mailbox_id, uid)
) WITHOUT ROWID;
CREATE INDEX expunged_modseq ON expunged(mailbox_id, modseq);
