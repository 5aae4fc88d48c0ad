-- Who runs each key's latest attempt, so that an attempt that never ends still has an audit
-- entry: a process killed mid-attempt (or cut off from the database until its lease ran out)
-- writes none itself, and the attempt that takes its key over writes one for it (outcome
-- `abandoned`) in the statement that claims the key.
--   attempt_audited  the attempt's action, caller, request id, the caller's own key and the
--                    invoice it names, as JSON; NULL for attempts claimed before this column
ALTER TABLE create_requests ADD COLUMN attempt_audited jsonb;
