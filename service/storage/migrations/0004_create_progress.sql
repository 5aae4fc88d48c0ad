-- A Create's progress, recorded step by step in its idempotency key's row, so that a retry
-- resumes with the Stripe invoice it already made however long after (Stripe forgets its
-- own idempotency keys after 24 hours) and never makes a second one.
--   attempt      how many attempts claimed the key; each attempt derives fresh Stripe keys
--                from it, and only the attempt holding the lease may record progress
--   lease_until  until when the current attempt owns the key; a concurrent retry is told
--                to retry later instead of running the same Stripe calls alongside it
--   step         the last step known done: claimed, drafted, lined, finalized, done
--   customer     the Stripe customer, where a retry looks for a draft it never recorded
ALTER TABLE create_requests
    ADD COLUMN customer    text,
    ADD COLUMN attempt     integer NOT NULL DEFAULT 1,
    ADD COLUMN lease_until timestamptz,
    ADD COLUMN step        text NOT NULL DEFAULT 'claimed'
        CHECK (step IN ('claimed', 'drafted', 'lined', 'finalized', 'done')),
    ADD COLUMN updated_at  timestamptz NOT NULL DEFAULT now();

UPDATE create_requests SET step = 'done' WHERE response IS NOT NULL;

-- Keyless Creates: the first of identical requests within CREATE_DUPLICATE_WINDOW_S holds
-- the request's fingerprint and the key the service made for it; the others answer that
-- key's invoice instead of billing again.
CREATE TABLE keyless_creates (
    fingerprint     text PRIMARY KEY,
    idempotency_key text NOT NULL,
    claimed_at      timestamptz NOT NULL DEFAULT now()
);
