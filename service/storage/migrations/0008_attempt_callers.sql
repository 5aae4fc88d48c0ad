-- Who runs each key's latest attempt, and by which claim, so that an attempt that never
-- ends still has an audit entry, and a claim whose claimer never heard it was made can be
-- ended. A process killed mid-attempt (or cut off from the database until its lease ran
-- out) writes no entry itself; the attempt that takes its key over writes one for it
-- (outcome `abandoned`) in the transaction that claims the key. A key never claimed again
-- (the caller gave up, or sent no Idempotency-Key) gets no such entry.
--   attempt_audited  the attempt's action, caller, request id, the caller's own key and the
--                    invoice it names, as JSON
--   claim_id         chosen by the claimer, which ends the claim by it: also a claim whose
--                    commit it never heard of (a failover cut the connection as it committed),
--                    else the caller's retries waited out the lease
--   audited_attempt  which attempt the two above are of: a replica from before this
--                    migration takes a key over without setting them, and must neither lend
--                    its attempt the previous caller's name nor have it ended by the previous
--                    claim's id
ALTER TABLE create_requests
    ADD COLUMN attempt_audited jsonb,
    ADD COLUMN claim_id uuid,
    ADD COLUMN audited_attempt integer;
