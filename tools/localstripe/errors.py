"""Errors that look like Stripe's: 400 invalid_request_error, 402 card_error with the test
card's decline_code, 404 resource_missing, and a 500 api_error for a crash in the emulator.
Each answer says whether the request failed parameter validation (`invalid_param`, and
stock localstripe's own checks), which Stripe does not save under an idempotency key, or
was refused once it ran, which Stripe saves and replays (see idempotency.py)."""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler

from tools.localstripe.stock import UserError, resources


@dataclass(frozen=True)
class Decline:
    code: str
    decline_code: str | None
    message: str


GENERIC_DECLINE = Decline("card_declined", "generic_decline", "Your card was declined.")
# Stripe's test cards (https://docs.stripe.com/testing#declined-payments). localstripe
# already refuses to attach these, like Stripe; this table gives each its Stripe error.
DECLINES: Mapping[str, Decline] = MappingProxyType(
    {
        "4000000000000002": GENERIC_DECLINE,
        "4000000000000341": GENERIC_DECLINE,  # attaches fine, every charge declines
        "4000000000009995": Decline("card_declined", "insufficient_funds", "Your card has insufficient funds."),
        "4000000000009987": Decline("card_declined", "lost_card", "Your card was declined."),
        "4000000000009979": Decline("card_declined", "stolen_card", "Your card was declined."),
        "4000000000000069": Decline("expired_card", "expired_card", "Your card has expired."),
        "4000000000000127": Decline("incorrect_cvc", "incorrect_cvc", "Your card's security code is incorrect."),
        "4000000000000119": Decline(
            "processing_error",
            "processing_error",
            "An error occurred while processing your card. Try again in a little bit.",
        ),
        "4242424242424241": Decline("incorrect_number", None, "Your card number is incorrect."),
    }
)


def bad_request(message: str, **contents: str) -> Any:
    """A 400 invalid_request_error of a request that ran (the invoice's state refused it),
    raised by the caller; Stripe saves it under the request's idempotency key."""
    return UserError(400, message, dict(contents))


def invalid_param(message: str, **contents: str) -> Any:
    """A 400 invalid_request_error of a request whose parameters failed validation, which
    never ran: Stripe does not save it under the request's idempotency key."""
    error = UserError(400, message, dict(contents))
    error.invalid_param = True
    return error


# Stock localstripe's messages for parameters it refuses before running anything.
_STOCK_VALIDATION = re.compile(r"Bad request|Unexpected |Bad expand ")
# Set on the answer to a request that failed validation (read by the idempotency layer).
VALIDATION_FAILED = web.ResponseKey("invoice_service_validation_failed", bool)


def is_validation(exc: Any) -> bool:
    """Whether localstripe's UserError is a failed validation of the parameters."""
    if getattr(exc, "invalid_param", False):
        return True
    return exc.code == 400 and _STOCK_VALIDATION.match(str(exc.body["error"].get("message", ""))) is not None


def card_error(decline: Decline, **contents: str) -> Any:
    """A 402 the stripe SDK turns into stripe.CardError, with Stripe's code and decline_code."""
    body: dict[str, Any] = {"code": decline.code, **contents}
    if decline.decline_code:
        body["decline_code"] = decline.decline_code
    body["doc_url"] = "https://stripe.com/docs/error-codes/" + decline.code.replace("_", "-")
    error = UserError(402, decline.message, body)
    error.body["error"]["type"] = "card_error"
    return error


def decline_for(payment_method: Any) -> Decline:
    return DECLINES.get(getattr(payment_method, "_card_number", None) or "", GENERIC_DECLINE)


def reject_unknown(params: dict[str, Any]) -> None:
    """Stripe answers 400 for unknown parameters; a Python TypeError here would be a 500."""
    if params:
        raise invalid_param("Received unknown parameters: " + ", ".join(sorted(params)), param=sorted(params)[0])


def missing(param: str) -> Any:
    return invalid_param(f"Missing required param: {param}.", param=param, code="parameter_missing")


def one_of(value: Any, allowed: tuple[str, ...], param: str) -> str:
    """An enum parameter, refused in Stripe's words for enums."""
    if value not in allowed:
        choices = ", ".join(allowed[:-1]) + f", or {allowed[-1]}" if len(allowed) > 2 else " or ".join(allowed)
        raise invalid_param(f"Invalid {param}: must be one of {choices}", param=param)
    return str(value)


def as_int(value: Any, param: str, minimum: int | None = None) -> int:
    """An integer parameter (a form sends it as a string), refused as Stripe refuses it."""
    number = resources.try_convert_to_int(value)
    if not isinstance(number, int) or isinstance(number, bool):
        raise invalid_param(f"Invalid integer: {value}", param=param, code="parameter_invalid_integer")
    if minimum is not None and number < minimum:
        raise invalid_param(f"This value must be greater than or equal to {minimum}.", param=param)
    return number


def as_bool(value: Any, param: str) -> bool | None:
    value = resources.try_convert_to_bool(value)
    if value is None or isinstance(value, bool):
        return value
    raise invalid_param(f"Invalid boolean: {value!r}", param=param)


def _retrieve(cls: Any, /, id: str) -> Any:
    """StripeObject._api_retrieve with Stripe's message and code, so the SDK's
    InvalidRequestError says which object is missing."""
    obj = resources.store.get(f"{cls.object}:{id}")
    if obj is None:
        raise UserError(404, f"No such {cls.object}: '{id}'", {"code": "resource_missing"})
    return obj


def patch() -> None:
    """Patches localstripe's classes in place (see app.install)."""
    resources.StripeObject._api_retrieve = classmethod(_retrieve)


def error_response(status: int, error: dict[str, Any], headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"error": error}, status=status, headers=headers)


def api_error(message: str) -> web.Response:
    """Stripe's answer when it fails internally: a 500 api_error."""
    return error_response(500, {"type": "api_error", "message": message})


@web.middleware
async def stripe_shaped_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Renders localstripe's UserError itself (so the idempotency middleware sees a
    response) and gives 402s and 404s the type and code Stripe would; a crash is Stripe's
    500 api_error, which the idempotency middleware then saves, as Stripe does."""
    try:
        return await handler(request)
    except UserError as exc:
        error = exc.body["error"]
        if exc.code == 402:
            error["type"] = "card_error"
            if error.get("code") == "card_declined":
                error.setdefault("decline_code", "generic_decline")
        elif exc.code == 404:
            error.setdefault("code", "resource_missing")
        response = error_response(exc.code, error)
        response[VALIDATION_FAILED] = is_validation(exc)
        return response
    except web.HTTPException:  # aiohttp's own answers: no route, wrong method, ...
        raise
    except Exception:
        logging.getLogger(__name__).exception("%s %s crashed", request.method, request.path)
        return api_error("An unknown error occurred in the emulator (see its log).")
