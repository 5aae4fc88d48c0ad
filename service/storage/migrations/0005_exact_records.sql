-- Every invoice Stripe can produce, recorded exactly: a credit is negative and a large
-- invoice passes 2^31 minor units, so the amount is a bigint without a sign check.
ALTER TABLE invoices DROP CONSTRAINT IF EXISTS invoices_amount_check;
ALTER TABLE invoices ALTER COLUMN amount TYPE bigint;

-- The invoice's currency (lowercase ISO 4217), as Stripe reports it. NULL on records from
-- before this migration until their next webhook or a reconcile brings Stripe's; the API
-- answers STRIPE_DEFAULT_CURRENCY for them meanwhile.
ALTER TABLE invoices ADD COLUMN currency text CHECK (currency ~ '^[a-z]{3}$');

-- `created_at` is from now on when Stripe created the invoice (its `created`), not when the
-- service first heard of it; existing rows keep theirs until a webhook or a reconcile
-- carries Stripe's. Nothing else changes: the list order and page tokens already follow
-- created_at.
