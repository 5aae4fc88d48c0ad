-- Creates by idempotency key: a retry with the same key answers the stored Stripe
-- invoice instead of calling Stripe again; the same key with another request is refused.
CREATE TABLE create_requests (
    idempotency_key   text PRIMARY KEY,
    fingerprint       text NOT NULL,
    stripe_invoice_id text,
    response          jsonb,
    created_at        timestamptz NOT NULL DEFAULT now(),
    completed_at      timestamptz
);

-- Every Stripe event applied, so a redelivery is recognised and changes nothing.
CREATE TABLE stripe_events (
    id                text PRIMARY KEY,
    type              text NOT NULL,
    stripe_invoice_id text NOT NULL,
    outcome           text NOT NULL,
    received_at       timestamptz NOT NULL DEFAULT now()
);

-- Invoices Stripe deleted (drafts only): a late event must not bring them back.
CREATE TABLE deleted_invoices (
    stripe_invoice_id text PRIMARY KEY,
    deleted_at        timestamptz NOT NULL DEFAULT now()
);

-- The Stripe time (event `created`, seconds) of the newest fact applied to the record,
-- so an older event never overwrites a newer one within the same status.
ALTER TABLE invoices ADD COLUMN stripe_updated bigint NOT NULL DEFAULT 0;
