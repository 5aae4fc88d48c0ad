-- Money given back outside a credit note: a refund made on an invoice's payment in Stripe's
-- Dashboard, by its API or by support (refund.* events, reconcile). Stripe's refund names
-- its payment intent, not an invoice; invoice_payments says whose payment that is
-- (invoice_payment.paid since 2025-03-31.basil, an invoice's own `payment_intent` before).
-- Either can arrive first (Stripe does not order deliveries), so neither has a foreign key:
-- the invoice's totals count a refund once both are known, whichever came last.
CREATE TABLE invoice_payments (
    payment_intent    text PRIMARY KEY,
    stripe_invoice_id text NOT NULL,
    recorded_at       timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX invoice_payments_invoice ON invoice_payments (stripe_invoice_id);

-- Each refund as Stripe last described it. A refund that failed or was canceled gave
-- nothing back; pending and requires_action ones are on their way (Stripe's charge counts
-- them in its amount_refunded too). Minor units of `currency`.
CREATE TABLE refunds (
    id             text PRIMARY KEY,
    payment_intent text NOT NULL,
    status         text NOT NULL CHECK (status IN ('pending', 'requires_action', 'succeeded', 'failed', 'canceled')),
    amount         bigint NOT NULL CHECK (amount >= 0),
    currency       text CHECK (currency ~ '^[a-z]{3}$'),
    reason         text NOT NULL,
    created_at     timestamptz NOT NULL,
    -- The Stripe time of what the row holds (an event's `created`), as for invoices.
    stripe_updated bigint NOT NULL,
    updated_at     timestamptz NOT NULL
);
CREATE INDEX refunds_payment_intent ON refunds (payment_intent);

-- The refunds a credit note made or linked (its `refunds[].refund`, or the 2023 `refund`),
-- each with the part of it the note counts (`refunds[].amount_refunded`; a refund can be
-- linked in part): that part is in the note's `refunded`, so the totals count only the rest
-- of the refund again. NULL for a note recorded without them (before this migration, or by
-- the previous version during a rollout): which refunds it made is unknown, so the totals
-- count its `refunded` against refunds no note names (service/credit_notes.py).
ALTER TABLE credit_notes ADD COLUMN refund_ids text[], ADD COLUMN refund_amounts bigint[],
    ADD CONSTRAINT credit_notes_refund_links CHECK (
        (refund_ids IS NULL) = (refund_amounts IS NULL)
        AND cardinality(refund_ids) = cardinality(refund_amounts));

-- stripe_events.stripe_invoice_id holds, for a refund or invoice payment event, the
-- payment intent it was applied under (its lock key; the invoice may not be known yet).
COMMENT ON COLUMN stripe_events.stripe_invoice_id IS
    'the invoice the event was applied to; for refund.* and invoice_payment.* events, the payment intent';
