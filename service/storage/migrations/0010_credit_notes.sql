-- Money given back: Stripe's credit notes on an invoice, as Stripe last described each one
-- (credit_note.* events, reconcile, RefundInvoice), and the invoice record's totals of the
-- issued ones. A credit note's amount is split the way Stripe gives it back: `refunded`
-- to the original payment, `credited` to the customer's balance, `out_of_band` outside
-- Stripe; a void note gives nothing back. Minor units of the invoice's currency.
-- A note can arrive before its invoice's first event (Stripe does not order deliveries), so
-- there is no foreign key: the invoice's totals are brought up to date when its record is
-- made.
CREATE TABLE credit_notes (
    id                text PRIMARY KEY,
    stripe_invoice_id text NOT NULL,
    status            text NOT NULL CHECK (status IN ('issued', 'void')),
    amount            bigint NOT NULL CHECK (amount >= 0),
    refunded          bigint NOT NULL CHECK (refunded >= 0),
    credited          bigint NOT NULL CHECK (credited >= 0),
    out_of_band       bigint NOT NULL CHECK (out_of_band >= 0),
    currency          text CHECK (currency ~ '^[a-z]{3}$'),
    reason            text NOT NULL,
    memo              text NOT NULL,
    created_at        timestamptz NOT NULL,
    -- The Stripe time of what the row holds (an event's `created`), as for invoices.
    stripe_updated    bigint NOT NULL,
    updated_at        timestamptz NOT NULL
);
CREATE INDEX credit_notes_invoice ON credit_notes (stripe_invoice_id, created_at);

-- The totals a list and a watch show, kept by the same transaction that changes a note
-- (service/storage/credit_notes.py sums them from credit_notes, never adds to them).
-- Defaults keep the old code's inserts valid during a rollout (expand-only).
ALTER TABLE invoices ADD COLUMN amount_refunded bigint NOT NULL DEFAULT 0;
ALTER TABLE invoices ADD COLUMN amount_credited bigint NOT NULL DEFAULT 0;
ALTER TABLE invoice_changes ADD COLUMN amount_refunded bigint NOT NULL DEFAULT 0;
ALTER TABLE invoice_changes ADD COLUMN amount_credited bigint NOT NULL DEFAULT 0;

-- Migration 0006's trigger function, copying the two totals into the feed as well.
CREATE OR REPLACE FUNCTION invoice_changes_record() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    r invoices%ROWTYPE;
BEGIN
    IF TG_OP = 'DELETE' THEN
        r := OLD;
    ELSE
        r := NEW;
    END IF;
    IF EXISTS (SELECT 1 FROM invoice_changes
               WHERE stripe_invoice_id = r.stripe_invoice_id
                 AND xact > pg_current_xact_id()::text::bigint
                 AND xact < pg_snapshot_xmax(pg_current_snapshot())::text::bigint) THEN
        RAISE EXCEPTION 'invoice % was changed by a younger transaction; retry this one', r.stripe_invoice_id
            USING ERRCODE = 'serialization_failure';
    END IF;
    INSERT INTO invoice_changes (kind, id, stripe_invoice_id, user_id, user_name, status, amount, currency,
                                 invoice_pdf, created_at, updated_at, amount_refunded, amount_credited)
    VALUES (CASE TG_OP WHEN 'INSERT' THEN 'created' WHEN 'UPDATE' THEN 'updated' ELSE 'deleted' END,
            r.id, r.stripe_invoice_id, r.user_id, r.user_name, r.status, r.amount, r.currency,
            r.invoice_pdf, r.created_at, r.updated_at, r.amount_refunded, r.amount_credited);
    PERFORM pg_notify('invoice_changes', '');
    RETURN NULL;
END $$;
