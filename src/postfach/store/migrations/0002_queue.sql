-- Schema version 2: the outbound queue. One row per message, one row per recipient with its own
-- state; the bytes are a refcounted blob like any stored message.

CREATE TABLE queue (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    sender       TEXT NOT NULL,
    blob_id      TEXT NOT NULL REFERENCES blob(id),
    size         INTEGER NOT NULL,
    created      INTEGER NOT NULL,
    next_attempt INTEGER NOT NULL,
    attempts     INTEGER NOT NULL DEFAULT 0,
    last_error   TEXT,
    ret          TEXT,
    envid        TEXT,
    requiretls   INTEGER NOT NULL DEFAULT 0,
    smtputf8     INTEGER NOT NULL DEFAULT 0,
    delay_warned INTEGER NOT NULL DEFAULT 0,
    extra        TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX queue_next_attempt ON queue(next_attempt);
CREATE INDEX queue_blob ON queue(blob_id);

CREATE TABLE queue_recipient (
    queue_id   INTEGER NOT NULL REFERENCES queue(id) ON DELETE CASCADE,
    idx        INTEGER NOT NULL,
    address    TEXT NOT NULL,
    state      TEXT NOT NULL,
    attempts   INTEGER NOT NULL DEFAULT 0,
    last_error TEXT,
    notify     TEXT,
    orcpt      TEXT,
    PRIMARY KEY (queue_id, idx)
) WITHOUT ROWID;
