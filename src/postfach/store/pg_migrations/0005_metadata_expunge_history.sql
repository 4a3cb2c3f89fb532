-- Schema version 5 (the embedded store's migration 0005, same tables): IMAP METADATA entries
-- (RFC 5464) and the trimming of the expunge history (RFC 7162 §3.2.5.2).

-- mailbox_id 0 = a server entry; name in lower case; value: the octets.
CREATE TABLE metadata (
    account_id bigint NOT NULL REFERENCES account(id),
    mailbox_id bigint NOT NULL,
    name       text NOT NULL,
    value      bytea NOT NULL,
    PRIMARY KEY (account_id, mailbox_id, name)
);

-- Checkpoints of HIGHESTMODSEQ taken by the history sweep (see the embedded store's 0005).
CREATE TABLE expunge_mark (
    mailbox_id bigint NOT NULL REFERENCES mailbox(id),
    modseq     bigint NOT NULL,
    marked     timestamptz NOT NULL,
    PRIMARY KEY (mailbox_id, modseq)
);

-- Per mailbox, the highest modseq up to which expunged rows were trimmed.
CREATE TABLE expunge_floor (
    mailbox_id bigint PRIMARY KEY REFERENCES mailbox(id),
    modseq     bigint NOT NULL
);
