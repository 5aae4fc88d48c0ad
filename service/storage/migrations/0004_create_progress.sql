-- A Create's progress, recorded step by step in its idempotency key's row, so that a retry
-- resumes with the Stripe invoice it already made however long after (Stripe forgets its
-- own idempotency keys after 24 hours) and never makes a second one.
--   attempt         how many attempts claimed the key; only the attempt holding the lease
--                   may record progress (a fencing token)
--   lease_until     until when the current attempt owns the key; a concurrent retry waits
--                   for its answer instead of running the same steps beside it
--   stripe_key_gen  which Stripe Idempotency-Keys the steps use; a new generation only
--                   after Stripe replayed a 5xx it saved for one of them (a timeout keeps
--                   them, so Stripe collapses a call still in flight with its retry)
--   step            the last step known done: claimed, drafted, lined, finalized, done;
--                   `legacy` for a Create of the service before this migration (also one
--                   an old replica claims during the rollout), whose invoice carries no
--                   key in its metadata: the default, so that only this version's claims
--                   say `claimed`
--   updated_at      when the row last changed, for an operator looking at a stuck key
ALTER TABLE create_requests
    ADD COLUMN attempt        integer NOT NULL DEFAULT 1,
    ADD COLUMN lease_until    timestamptz,
    ADD COLUMN stripe_key_gen integer NOT NULL DEFAULT 1,
    ADD COLUMN step           text NOT NULL DEFAULT 'legacy'
        CHECK (step IN ('legacy', 'claimed', 'drafted', 'lined', 'finalized', 'done')),
    ADD COLUMN updated_at     timestamptz NOT NULL DEFAULT now();

UPDATE create_requests SET step = 'done' WHERE response IS NOT NULL;

-- Keyless Creates: the first of identical requests within CREATE_DUPLICATE_WINDOW_S holds
-- the request's fingerprint and the key the service made for it; the others answer that
-- key's invoice instead of billing again.
CREATE TABLE keyless_creates (
    fingerprint     text PRIMARY KEY,
    idempotency_key text NOT NULL,
    claimed_at      timestamptz NOT NULL DEFAULT now()
);
