-- Exact invoice counts without scanning: counters per (shard, status), kept by statement
-- triggers in the same transaction as the change, so a reader's snapshot sees rows and
-- counts that agree. Each connection writes the shard of its backend pid, so concurrent
-- writers rarely touch the same counter row.
CREATE TABLE invoice_counts (
    shard  smallint NOT NULL,
    status text NOT NULL,
    n      bigint NOT NULL,
    PRIMARY KEY (shard, status)
);

INSERT INTO invoice_counts (shard, status, n)
SELECT 0, status, count(*) FROM invoices GROUP BY status;

-- Rows are added to counters in status order, so two transactions that share a shard
-- lock its rows in the same order and cannot deadlock.
CREATE FUNCTION invoice_counts_apply() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO invoice_counts (shard, status, n)
        SELECT pg_backend_pid() % 16, status, count(*) FROM new_rows GROUP BY status ORDER BY status
        ON CONFLICT (shard, status) DO UPDATE SET n = invoice_counts.n + EXCLUDED.n;
    ELSIF TG_OP = 'DELETE' THEN
        INSERT INTO invoice_counts (shard, status, n)
        SELECT pg_backend_pid() % 16, status, -count(*) FROM old_rows GROUP BY status ORDER BY status
        ON CONFLICT (shard, status) DO UPDATE SET n = invoice_counts.n + EXCLUDED.n;
    ELSE
        INSERT INTO invoice_counts (shard, status, n)
        SELECT pg_backend_pid() % 16, status, sum(d) FROM (
            SELECT status, -1 AS d FROM old_rows UNION ALL SELECT status, 1 FROM new_rows
        ) AS moves GROUP BY status HAVING sum(d) <> 0 ORDER BY status
        ON CONFLICT (shard, status) DO UPDATE SET n = invoice_counts.n + EXCLUDED.n;
    END IF;
    RETURN NULL;
END $$;

CREATE FUNCTION invoice_counts_reset() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM invoice_counts;
    RETURN NULL;
END $$;

CREATE TRIGGER invoices_count_insert AFTER INSERT ON invoices
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION invoice_counts_apply();
CREATE TRIGGER invoices_count_delete AFTER DELETE ON invoices
    REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT EXECUTE FUNCTION invoice_counts_apply();
CREATE TRIGGER invoices_count_update AFTER UPDATE ON invoices
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION invoice_counts_apply();
CREATE TRIGGER invoices_count_truncate AFTER TRUNCATE ON invoices
    FOR EACH STATEMENT EXECUTE FUNCTION invoice_counts_reset();

-- Filtered lists walk these in list order (newest first) and stop after one page; a
-- token's position is a seek into the same order.
CREATE INDEX invoices_status_created_at_id ON invoices (status, created_at DESC, id DESC);
CREATE INDEX invoices_user_created_at_id ON invoices (user_id, created_at DESC, id DESC);
