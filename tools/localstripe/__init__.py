"""The Stripe emulator for the tests and `make run`: localstripe, extended in memory for
the calls InvoiceService makes against real Stripe.

    python -m tools.localstripe --port 8420 [--from-scratch] [--host 127.0.0.1]

Why it exists: the service must only make calls that are valid for real Stripe, and it
creates an invoice the race-free way (a draft with pending_invoice_items_behavior=exclude,
its items attached by invoice id, finalize, then pay with a given payment method), each
call carrying an Idempotency-Key. Stock localstripe 1.15.10 crashes on or refuses most of
these and ignores idempotency keys. Rather than bend the service to the emulator, this
package imports localstripe's modules, patches its classes and routes, adds middlewares
to its aiohttp app before it starts, and serves it. One module per thing it extends:

- invoices: POST /v1/invoices also takes currency, collection_method, auto_advance,
  default_payment_method; with pending_invoice_items_behavior=exclude it makes an empty
  draft in that currency (never "nothing to invoice"); otherwise it sweeps the customer's
  pending items, also for customers without a subscription. POST
  /v1/invoices/{id}/add_lines (new): lines[i][amount|description|metadata] and
  invoice_metadata; each line becomes an invoice item of that draft, in order, all or
  none; emits invoice.updated. GET /v1/invoices takes created[gt|gte|lt|lte] and status,
  newest first. `total` no longer includes the customer's balance.
- invoice_lifecycle: POST /v1/invoices/{id}/finalize and /mark_uncollectible (new); /pay
  takes payment_method and answers a decline with a Stripe-shaped 402 card error; /void
  accepts invoices that never had a payment attempt. Each emits its Stripe webhook.
  Finalizing sets invoice_pdf and hosted_invoice_url (null before) to links on the
  emulator, which it does not serve. Finalizing (also through /pay of a draft) applies
  the customer's balance first (starting_balance, ending_balance), then settles an amount
  due below the currency's minimum charge as Stripe does: the invoice is paid with
  amount_due 0 and the amount is carried to the customer's balance, for the next
  invoice. /pay of a paid or void invoice is Stripe's 400.
- invoice_items: POST /v1/invoiceitems with invoice=in_...: the item becomes a line of
  that draft; a non-draft invoice is a 400 invoice_not_editable, and an invoice holds at
  most 250 lines.
- customers: POST /v1/customers and /v1/customers/{id} take `balance` (negative is
  credit), and customers show it; a credit note's credit to the balance is recorded as a
  customer balance transaction (expandable from the note).
- credit_notes (with credit_note_params, which checks the parameters): POST, GET
  /v1/credit_notes, GET /v1/credit_notes/preview, GET and POST /v1/credit_notes/{id},
  GET /v1/credit_notes/{id}/lines, POST /v1/credit_notes/{id}/void (new). A note on an
  open invoice first reduces its amount_due; the rest (all of it on a paid invoice) must
  be split into refund_amount or `refunds`, credit_amount and out_of_band_amount, and the
  invoice's pre/post_payment_credit_notes_amount grow; an invoice's notes never exceed
  its total. Voiding undoes a note, unless it refunded. Events: credit_note.created,
  .updated, .voided, invoice.updated (with previous_attributes).
- refunds: POST /v1/refunds refuses more than the charge still holds, in Stripe's words,
  and, like a credit note's refund, sends refund.created and charge.refunded; GET
  /v1/refunds takes charge, payment_intent and created, newest first.
- payment_methods: POST /v1/payment_methods/{id}/attach: Stripe's declining test cards
  (4000000000000002, ...) are refused with a card_error, as Stripe refuses them;
  4000000000000341 attaches and declines when charged.
- idempotency: every POST with an Idempotency-Key is replayed, or refused with
  idempotency_error when its parameters differ, as Stripe does (kept in memory only):
  the answer of every request that ran is saved, refusals included (a 400 of an invoice
  already paid, a 402 decline, a 404); failed parameter validation (errors.invalid_param)
  and 409s are not.
- errors: errors look like Stripe's: card_error with decline_code for 402s,
  resource_missing for 404s, "Received unknown parameters" instead of crashes for the
  invoice calls, and an api_error 500 for a crash in the emulator.
- shapes: objects are exported as API 2026-10-28.endive shows them (the version the
  service's SDK pins), not as stock localstripe's 2017 ones: removed fields go
  (invoice.charge, line.invoice_item, now line.parent.invoice_item_details...), fields
  Stripe always answers come (refunds too); events carry pending_webhooks.
- recorder: with LOCALSTRIPE_RECORD_DIR set (the tests set it), every /v1 exchange and
  every event is appended to a JSON-lines file there, for the Stripe referee
  (tests/referee).
- config (with faults): test hooks under /_config/: POST /_config/idempotency/forget
  (Stripe's 24 h expiry, now); POST and DELETE /_config/faults (the next matching
  requests answer a 500, before or after running, saved under their idempotency key);
  GET and DELETE /_config/calls (how many /v1 calls, by method and route); POST, GET and
  DELETE /_config/races (races: before the next matching request runs, the emulator
  makes another request of its own, e.g. pays the invoice out of band); GET
  /_config/deliveries (webhook deliveries still on their way).
- webhooks: every delivery counted while in flight; with --webhook-retry-s, each is retried
  with backoff until answered 2xx (for that long), as Stripe retries, instead of sent once;
  with --webhook-late-s and --webhook-duplicates, late, out of order and doubled, as
  Stripe sends them.
- version: the guard. Every patch relies on localstripe's internals, so nothing is
  patched unless the installed localstripe is the one pinned in pyproject.toml; any
  other version is a RuntimeError naming both.
- stock (localstripe's modules, imported after the guard), app (install, build_app,
  listen) and __main__ (the command line).

localstripe is GPL-3 test/dev tooling. It runs as its own process, started by
tools/stack.py and the tests; the service package never imports localstripe or this
package, it only talks HTTP to it. This file imports nothing, so that importing
tools.localstripe.version does not import localstripe.
"""
