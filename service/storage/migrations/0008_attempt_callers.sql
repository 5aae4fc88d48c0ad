-- Who runs each key's latest attempt, so that an attempt that never ends still has an audit
-- entry: a process killed mid-attempt (or cut off from the database until its lease ran out)
-- writes none itself, and the attempt that takes its key over writes one for it (outcome
-- `abandoned`) in the transaction that claims the key. A key never claimed again (the
-- caller gave up, or sent no Idempotency-Key) gets no such entry.
--   attempt_audited  the attempt's action, caller, request id, the caller's own key and the
--                    invoice it names, as JSON
--   audited_attempt  which attempt attempt_audited is of: a replica from before this
--                    migration takes a key over without saying who, and must not lend its
--                    attempt the previous caller's name
--   claim_id         chosen by the claimer, which ends the claim by it: also a claim whose
--                    commit it never heard of (a failover cut the connection as it committed),
--                    else the caller's retries waited out the lease
ALTER TABLE create_requests
    ADD COLUMN attempt_audited jsonb,
    ADD COLUMN audited_attempt integer,
    ADD COLUMN claim_id uuid;
