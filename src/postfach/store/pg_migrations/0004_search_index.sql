-- Schema version 4: the full-text index and the SORT/THREAD keys, made once per blob at ingest (the
-- embedded store's migration 0004, same columns: postfach.mail.search.SortRow and IndexText).
-- Substring search uses pg_trgm: a GIN trigram index answers LIKE '%needle%' on the folded text,
-- and PostgreSQL rechecks every candidate row, so the answer is exact.
--
-- blob.fts: NULL = not indexed yet (a background task fills it in), true = indexed (a blob_index
-- row exists; set by the trigger below), false = cannot be indexed (searches scan it).

CREATE EXTENSION IF NOT EXISTS pg_trgm WITH SCHEMA public;

ALTER TABLE blob ADD COLUMN fts boolean;
CREATE INDEX blob_unindexed ON blob (id) WHERE fts IS NOT TRUE;

CREATE TABLE blob_index (
    blob_id      text PRIMARY KEY REFERENCES blob(id) ON DELETE CASCADE,
    date         double precision,  -- sent date, UTC timestamp; NULL when absent
    from_addr    text NOT NULL,
    to_addr      text NOT NULL,
    cc_addr      text NOT NULL,
    subject      text NOT NULL,     -- folded base subject
    display_from text NOT NULL,
    display_to   text NOT NULL,
    message_id   text NOT NULL,
    refs         text NOT NULL,     -- one message id per line
    reply        boolean NOT NULL,
    t_subject    text NOT NULL,     -- folded search text (IndexText)
    t_from       text NOT NULL,
    t_to         text NOT NULL,
    t_cc         text NOT NULL,
    t_bcc        text NOT NULL,
    t_header     text NOT NULL,
    t_body       text NOT NULL,
    t_names      text NOT NULL
);
CREATE INDEX blob_index_subject ON blob_index USING gin (t_subject public.gin_trgm_ops);
CREATE INDEX blob_index_from ON blob_index USING gin (t_from public.gin_trgm_ops);
CREATE INDEX blob_index_to ON blob_index USING gin (t_to public.gin_trgm_ops);
CREATE INDEX blob_index_cc ON blob_index USING gin (t_cc public.gin_trgm_ops);
CREATE INDEX blob_index_bcc ON blob_index USING gin (t_bcc public.gin_trgm_ops);
CREATE INDEX blob_index_header ON blob_index USING gin (t_header public.gin_trgm_ops);
CREATE INDEX blob_index_body ON blob_index USING gin (t_body public.gin_trgm_ops);

CREATE FUNCTION postfach_blob_indexed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE blob SET fts = true WHERE id = NEW.blob_id AND fts IS NOT TRUE;
    RETURN NULL;
END;
$$;

CREATE TRIGGER blob_index_ai AFTER INSERT ON blob_index FOR EACH ROW EXECUTE FUNCTION postfach_blob_indexed();
