-- How many times each event's effect was applied, counted by the transaction that applies
-- it (the statement that stores the event's outcome adds one), so that an event applied
-- twice shows as 2 in the database whatever its deliveries were answered. A redelivery
-- recognised as already applied adds nothing. The primary key alone cannot show a double:
-- it keeps one row per event id however often the effect was applied.
-- NULL: recorded by code from before this migration, which does not count (expand-only: old
-- replicas keep inserting without the column during a rollout; NULL + 1 stays NULL, so
-- such a row is never mistaken for a counted one).
ALTER TABLE stripe_events ADD COLUMN applications integer;
