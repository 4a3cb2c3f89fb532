-- Schema version 5: IMAP METADATA entries (RFC 5464) and the trimming of the expunge history
-- (RFC 7162 §3.2.5.2, config imap.expunge_history_days).
--
-- metadata: one row per entry. mailbox_id 0 = a server entry (GETMETADATA ""), else the mailbox's
-- id (entries follow RENAME by id and go with DELETE). name: the entry name in lower case
-- (§3.2: names are case-insensitive), starting with /private/ or /shared/. value: the octets.
CREATE TABLE metadata (
    account_id INTEGER NOT NULL REFERENCES account(id),
    mailbox_id INTEGER NOT NULL,
    name       TEXT NOT NULL,
    value      BLOB NOT NULL,
    PRIMARY KEY (account_id, mailbox_id, name)
) WITHOUT ROWID;

-- expunge_mark: (mailbox, HIGHESTMODSEQ, when) checkpoints taken by the history sweep; every
-- expunge with a modseq up to a checkpoint's happened before its time, so when a checkpoint is
-- older than the retention the expunged rows up to its modseq can go.
CREATE TABLE expunge_mark (
    mailbox_id INTEGER NOT NULL REFERENCES mailbox(id),
    modseq     INTEGER NOT NULL,
    marked     INTEGER NOT NULL,           -- microseconds since the epoch
    PRIMARY KEY (mailbox_id, modseq)
) WITHOUT ROWID;

-- expunge_floor: per mailbox, the highest modseq up to which expunged rows were trimmed. A
-- QRESYNC client whose modseq is below it cannot be told its VANISHED set from the log.
CREATE TABLE expunge_floor (
    mailbox_id INTEGER PRIMARY KEY REFERENCES mailbox(id),
    modseq     INTEGER NOT NULL
);
