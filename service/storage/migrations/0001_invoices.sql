-- The service's record of each Stripe invoice, found by its own id or by Stripe's.
CREATE TABLE invoices (
    id                text PRIMARY KEY CHECK (id ~ '^[0-9a-f]{24}$'),
    stripe_invoice_id text NOT NULL UNIQUE CHECK (stripe_invoice_id LIKE 'in\_%'),
    user_id           text NOT NULL,
    user_name         text NOT NULL,
    status            text NOT NULL CHECK (status IN ('draft', 'open', 'paid', 'uncollectible', 'void')),
    amount            integer NOT NULL CHECK (amount >= 0),
    invoice_pdf       text NOT NULL DEFAULT '',
    created_at        timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now()
);

-- Lists are newest first; the id breaks ties so pages are stable.
CREATE INDEX invoices_created_at_id ON invoices (created_at DESC, id DESC);
