-- Schema version 6: the bytes of small messages live in the database instead of a file of their
-- own, so that one commit (one fsync of the WAL) makes a delivery durable: no file to create, no
-- folder entry, no filesystem sync per batch. Bigger messages keep their file under blobs/.
-- Either way the ``blob`` row holds size, refcount and parse; a reader looks here first.
-- ``id`` and not ``blob_id``: this row is the blob's content, not a reference to it (the backup's
-- generic reference scan looks for ``blob_id`` columns).
CREATE TABLE blob_inline (
    seq  INTEGER PRIMARY KEY,
    id   TEXT NOT NULL UNIQUE,  -- blob.id (sha256 of data)
    data BLOB NOT NULL
);

-- A blob removed (refcount 0, any path) takes its bytes with it.
CREATE TRIGGER blob_inline_ad AFTER DELETE ON blob BEGIN
    DELETE FROM blob_inline WHERE id = old.id;
END;
