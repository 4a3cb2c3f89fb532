-- Schema version 2: APPEND / delivery of messages up to one chunk in one round trip. The same
-- steps as PostgresStore._insert_messages, in the same lock order (account row, mailbox row,
-- blob rows by id), with the change notification sent from inside the transaction.
-- Errors: 'postfach:not-found:...', 'postfach:quota:STORAGE|MESSAGE', 'postfach:not-permitted:...'.

CREATE FUNCTION postfach_append(
    p_account bigint,
    p_mailbox bigint,
    p_ids     text[],
    p_sizes   bigint[],
    p_infos   bytea[],
    p_datas   bytea[],
    p_flags   text[],         -- per message: flags joined by single spaces
    p_idates  timestamptz[],
    p_check   boolean,        -- refuse when over quota afterwards
    p_channel text,
    p_node    bigint
) RETURNS TABLE (o_uidvalidity bigint, o_first bigint, o_modseq bigint)
LANGUAGE plpgsql AS $$
DECLARE
    n      integer := cardinality(p_ids);
    total  bigint;
    qb     bigint;
    qm     bigint;
    ub     bigint;
    um     bigint;
    nxt    bigint;
    ms     bigint;
    uv     bigint;
    k      integer;
    cnt    bigint;
    ins    boolean;
BEGIN
    SELECT coalesce(sum(s), 0) INTO total FROM unnest(p_sizes) AS s;
    UPDATE account SET used_bytes = used_bytes + total, used_messages = used_messages + n
        WHERE id = p_account
        RETURNING quota_bytes, quota_messages, used_bytes, used_messages INTO qb, qm, ub, um;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'postfach:not-found:no such mailbox';
    END IF;
    IF p_check AND total > 0 AND qb IS NOT NULL AND ub > qb THEN
        RAISE EXCEPTION 'postfach:quota:STORAGE';
    END IF;
    IF p_check AND n > 0 AND qm IS NOT NULL AND um > qm THEN
        RAISE EXCEPTION 'postfach:quota:MESSAGE';
    END IF;
    UPDATE mailbox SET uidnext = uidnext + n, highestmodseq = highestmodseq + 1
        WHERE id = p_mailbox AND account_id = p_account
        RETURNING uidnext, highestmodseq, uidvalidity INTO nxt, ms, uv;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'postfach:not-found:no such mailbox';
    END IF;
    IF nxt - 1 > 4294967295 THEN
        RAISE EXCEPTION 'postfach:not-permitted:the mailbox has run out of UIDs';
    END IF;
    FOR k IN SELECT DISTINCT ON (p_ids[j]) j FROM generate_subscripts(p_ids, 1) AS j ORDER BY p_ids[j], j LOOP
        SELECT count(*) INTO cnt FROM unnest(p_ids) AS x WHERE x = p_ids[k];
        INSERT INTO blob (id, size, refcount, info) VALUES (p_ids[k], p_sizes[k], cnt, p_infos[k])
            ON CONFLICT (id) DO UPDATE SET refcount = blob.refcount + EXCLUDED.refcount,
                                           info = coalesce(blob.info, EXCLUDED.info)
            RETURNING (xmax = 0) INTO ins;
        IF ins AND p_sizes[k] > 0 THEN
            INSERT INTO blob_chunk (blob_id, seq, data) VALUES (p_ids[k], 0, p_datas[k]);
        END IF;
    END LOOP;
    INSERT INTO message (mailbox_id, uid, blob_id, size, internaldate, savedate, flags, seen, deleted, modseq)
        SELECT p_mailbox, nxt - n + j - 1, p_ids[j], p_sizes[j], p_idates[j], clock_timestamp(), f.a,
               '\Seen' = ANY (f.a), '\Deleted' = ANY (f.a), ms
        FROM generate_subscripts(p_ids, 1) AS j,
             LATERAL (SELECT coalesce(string_to_array(nullif(p_flags[j], ''), ' '), '{}'::text[]) AS a) AS f;
    PERFORM pg_notify(p_channel, json_build_object(
        'n', p_node, 'a', p_account, 'k', 'append', 'm', p_mailbox, 's', ms,
        'u', json_build_array(json_build_array(nxt - n, nxt - 1)))::text);
    RETURN QUERY SELECT uv, nxt - n, ms;
END;
$$;
