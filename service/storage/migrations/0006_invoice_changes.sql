-- The change feed WatchInvoices streams: one row per change to an invoice record, written
-- by a trigger in the same transaction as the change, so no writer can change a record
-- without the feed hearing of it and a rolled-back change is never heard of.
--
-- A feed position is (xact, seq): the writing transaction's id, then the row's sequence.
-- Sequence numbers alone are not a safe position: they are drawn when a row is written,
-- not when it commits, so a reader that has seen seq 11 can later find seq 10 commit, and
-- a watcher resuming after 11 would never get it. A reader instead takes only the rows of
-- transactions older than its snapshot's xmin (all of them finished, so no row can still
-- appear below that point) in (xact, seq) order: every later commit sorts after what it
-- has read. xact is the 64-bit, epoch-extended id (pg_current_xact_id), which never wraps
-- and carries over to a promoted standby.
CREATE TABLE invoice_changes (
    seq               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    xact              bigint NOT NULL DEFAULT pg_current_xact_id()::text::bigint,
    kind              text NOT NULL CHECK (kind IN ('created', 'updated', 'deleted')),
    -- When the change was written, a moment before its commit: the feed's delay is measured from it.
    changed_at        timestamptz NOT NULL DEFAULT clock_timestamp(),
    -- The record as the change left it (as it was, for a deletion).
    id                text NOT NULL,
    stripe_invoice_id text NOT NULL,
    user_id           text NOT NULL,
    user_name         text NOT NULL,
    status            text NOT NULL,
    amount            bigint NOT NULL,
    currency          text,
    invoice_pdf       text NOT NULL,
    created_at        timestamptz NOT NULL,
    updated_at        timestamptz NOT NULL
);

CREATE INDEX invoice_changes_position ON invoice_changes (xact, seq);
-- The trigger's order check, and the replay of a watch of one invoice by Stripe's id.
CREATE INDEX invoice_changes_record ON invoice_changes (stripe_invoice_id, xact);
-- Pruning finds the changes older than the retention by time.
CREATE INDEX invoice_changes_changed_at ON invoice_changes (changed_at);

-- The newest position pruning has removed: a resume token at or after it misses nothing, one
-- before it is OUT_OF_RANGE. One row, moved only forward.
CREATE TABLE invoice_changes_horizon (
    only_row boolean PRIMARY KEY DEFAULT true CHECK (only_row),
    xact     bigint NOT NULL,
    seq      bigint NOT NULL
);
INSERT INTO invoice_changes_horizon (xact, seq) VALUES (0, 0);

-- Only what a caller can see: an UPDATE that leaves every column as it was is not a change.
-- The NOTIFY is a wake-up for the readers that LISTEN; it carries nothing, Postgres folds a
-- transaction's identical notifications into one and delivers it at commit, and a reader
-- that cannot LISTEN (behind PgBouncer) polls instead.
--
-- The feed is in transaction-id order, so two changes to one record reach watchers in the
-- order they were made only if the later one's transaction has the higher id. The store's
-- writers make sure of it (they take the invoice's advisory lock before their first write,
-- so before they have an id); a writer that does not (an operator's SQL, a backfill) and
-- would change a record after a younger transaction did is refused with a serialization
-- failure, to retry, rather than leave watchers with a stale record.
CREATE FUNCTION invoice_changes_record() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    r invoices%ROWTYPE;
BEGIN
    IF TG_OP = 'DELETE' THEN
        r := OLD;
    ELSE
        r := NEW;
    END IF;
    -- Below the snapshot's xmax: a younger transaction that committed always is, and rows
    -- copied in from another cluster (a logical restore) with ids this one has not reached
    -- must not refuse every write to their invoices until they are pruned.
    IF EXISTS (SELECT 1 FROM invoice_changes
               WHERE stripe_invoice_id = r.stripe_invoice_id
                 AND xact > pg_current_xact_id()::text::bigint
                 AND xact < pg_snapshot_xmax(pg_current_snapshot())::text::bigint) THEN
        RAISE EXCEPTION 'invoice % was changed by a younger transaction; retry this one', r.stripe_invoice_id
            USING ERRCODE = 'serialization_failure';
    END IF;
    INSERT INTO invoice_changes (kind, id, stripe_invoice_id, user_id, user_name, status, amount, currency,
                                 invoice_pdf, created_at, updated_at)
    VALUES (CASE TG_OP WHEN 'INSERT' THEN 'created' WHEN 'UPDATE' THEN 'updated' ELSE 'deleted' END,
            r.id, r.stripe_invoice_id, r.user_id, r.user_name, r.status, r.amount, r.currency,
            r.invoice_pdf, r.created_at, r.updated_at);
    PERFORM pg_notify('invoice_changes', '');
    RETURN NULL;
END $$;

CREATE TRIGGER invoices_changes_insert AFTER INSERT ON invoices
    FOR EACH ROW EXECUTE FUNCTION invoice_changes_record();
CREATE TRIGGER invoices_changes_update AFTER UPDATE ON invoices
    FOR EACH ROW WHEN (OLD.* IS DISTINCT FROM NEW.*) EXECUTE FUNCTION invoice_changes_record();
CREATE TRIGGER invoices_changes_delete AFTER DELETE ON invoices
    FOR EACH ROW EXECUTE FUNCTION invoice_changes_record();
