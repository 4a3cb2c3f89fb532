-- Schema version 4: the full-text index and the SORT/THREAD keys, made once per blob at ingest.
--
-- blob.fts: NULL = not indexed yet (blobs stored before this version; a background task fills
-- them in), 1 = indexed (blob_key and blob_text rows exist), 0 = cannot be indexed (the parser
-- failed): searches scan such blobs as before. The partial index finds the few not indexed.
ALTER TABLE blob ADD COLUMN fts INTEGER;
CREATE INDEX blob_unindexed ON blob(id) WHERE fts IS NOT 1;

-- SORT/THREAD keys (postfach.mail.search.SortRow), one row per indexed blob; its integer id is
-- also the rowid of the blob's full-text row.
CREATE TABLE blob_key (
    id           INTEGER PRIMARY KEY,  -- reused after a delete: the triggers clear every row first
    blob_id      TEXT NOT NULL UNIQUE REFERENCES blob(id),
    date         REAL,     -- sent date, UTC timestamp; NULL when absent
    from_addr    TEXT NOT NULL,
    to_addr      TEXT NOT NULL,
    cc_addr      TEXT NOT NULL,
    subject      TEXT NOT NULL,  -- folded base subject
    display_from TEXT NOT NULL,
    display_to   TEXT NOT NULL,
    message_id   TEXT NOT NULL,
    refs         TEXT NOT NULL,  -- one message id per line
    reply        INTEGER NOT NULL
);

-- The same keys per message, so that SORT/THREAD load a mailbox's keys with one range scan
-- (100,000 messages: one pass over adjacent rows instead of 100,000 lookups by blob id). Kept by
-- triggers: a message row brings its blob's keys along (append, copy, move), a blob indexed later
-- (the backfill) hands them to its messages, an expunge takes them away.
CREATE TABLE message_key (
    mailbox_id   INTEGER NOT NULL,
    uid          INTEGER NOT NULL,
    date         REAL,
    from_addr    TEXT NOT NULL,
    to_addr      TEXT NOT NULL,
    cc_addr      TEXT NOT NULL,
    subject      TEXT NOT NULL,
    display_from TEXT NOT NULL,
    display_to   TEXT NOT NULL,
    message_id   TEXT NOT NULL,
    refs         TEXT NOT NULL,
    reply        INTEGER NOT NULL,
    PRIMARY KEY (mailbox_id, uid)
) WITHOUT ROWID;

CREATE TRIGGER message_key_ai AFTER INSERT ON message BEGIN
    INSERT OR REPLACE INTO message_key
        SELECT new.mailbox_id, new.uid, date, from_addr, to_addr, cc_addr, subject, display_from, display_to,
               message_id, refs, reply
        FROM blob_key WHERE blob_id = new.blob_id;
END;

CREATE TRIGGER message_key_ad AFTER DELETE ON message BEGIN
    DELETE FROM message_key WHERE mailbox_id = old.mailbox_id AND uid = old.uid;
END;

CREATE TRIGGER blob_key_ai AFTER INSERT ON blob_key BEGIN
    INSERT OR REPLACE INTO message_key
        SELECT m.mailbox_id, m.uid, new.date, new.from_addr, new.to_addr, new.cc_addr, new.subject, new.display_from,
               new.display_to, new.message_id, new.refs, new.reply
        FROM message m WHERE m.blob_id = new.blob_id;
END;

-- The folded text the IMAP matcher compares with (postfach.mail.search.IndexText): the content of
-- the full-text index (external content: the text is stored once, here).
CREATE TABLE blob_text (
    id      INTEGER PRIMARY KEY,  -- blob_key.id
    subject TEXT NOT NULL,
    sender  TEXT NOT NULL,        -- From
    rcpt_to TEXT NOT NULL,
    cc      TEXT NOT NULL,
    bcc     TEXT NOT NULL,
    header  TEXT NOT NULL,
    body    TEXT NOT NULL,
    names   TEXT NOT NULL         -- attachment file names
);

-- Trigrams make any substring of three or more characters findable (IMAP SEARCH is a substring
-- match); the text is folded already, so the tokenizer need not fold. detail=column keeps column
-- filters (SUBJECT must not match body text) at about half the size of detail=full.
CREATE VIRTUAL TABLE blob_fts USING fts5(
    subject, sender, rcpt_to, cc, bcc, header, body, names,
    content='blob_text', content_rowid='id', tokenize='trigram case_sensitive 1', detail=column
);

-- Rows go into blob_fts with the same statement values as into blob_text (store/sqlite.py
-- _insert_index), not by trigger: FTS5 flushes its pending terms at every savepoint, and a trigger
-- runs in one, which made each insert four times dearer.

CREATE TRIGGER blob_text_ad AFTER DELETE ON blob_text BEGIN
    INSERT INTO blob_fts (blob_fts, rowid, subject, sender, rcpt_to, cc, bcc, header, body, names)
    VALUES ('delete', old.id, old.subject, old.sender, old.rcpt_to, old.cc, old.bcc, old.header, old.body,
            old.names);
END;

CREATE TRIGGER blob_key_ad AFTER DELETE ON blob_key BEGIN
    DELETE FROM blob_text WHERE id = old.id;
END;

-- Blob garbage collection (refcount 0, any path) takes the blob's index rows with it.
CREATE TRIGGER blob_ad AFTER DELETE ON blob BEGIN
    DELETE FROM blob_key WHERE blob_id = old.id;
END;
