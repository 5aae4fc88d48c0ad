-- The audit trail of the calls that move money: one row per Create, Pay or Void attempt
-- that ended, inserted by the statement that stored the attempt's answer under its key (or
-- released the key when it failed), so an answered call always has its row. Kept as long
-- as the service keeps anything: nothing prunes it, and the service's role may only read
-- and append (migrations.grant revokes UPDATE and DELETE).
--   caller             the API key's name (never the key) or the client certificate's subject
--   request_id         the call's x-request-id, to find its log lines
--   idempotency_key    the caller's key; NULL when it sent none
--   stripe_invoice_id  the invoice; NULL for a Create that ended before Stripe made one
--   outcome            `ok`, or the kind of domain error the attempt ended with
CREATE TABLE invoice_audit (
    seq               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at                timestamptz NOT NULL DEFAULT now(),
    action            text NOT NULL CHECK (action IN ('create', 'pay', 'void')),
    caller            text NOT NULL,
    request_id        text,
    idempotency_key   text,
    stripe_invoice_id text,
    attempt           integer NOT NULL,
    outcome           text NOT NULL,
    detail            text NOT NULL DEFAULT ''
);

CREATE INDEX invoice_audit_by_invoice ON invoice_audit (stripe_invoice_id, seq);
