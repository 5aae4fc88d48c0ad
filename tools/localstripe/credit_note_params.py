"""The parameters of POST /v1/credit_notes and GET /v1/credit_notes/preview, checked as
Stripe checks parameters before anything runs (errors.invalid_param: a refusal not saved
under an idempotency key): their types, Stripe's `reason` list, and the `lines` and
`refunds` arrays as API 2026-05-27 takes them. Whatever depends on the invoice (what is
left to credit, whose payment a refund took back) is credit_notes.py's.

The emulator's invoices carry no tax, discount or shipping and no payment records, so
`shipping_cost`, the lines' tax fields and `payment_record_refund` refunds are refused
rather than ignored."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tools.localstripe.errors import as_int, invalid_param, missing, one_of, reject_unknown
from tools.localstripe.invoices import metadata_of

# Stripe's `reason` of a credit note (API 2026-05-27 and the SDK's 2026-10-28 agree).
REASONS = ("duplicate", "fraudulent", "order_change", "product_unsatisfactory")
LINE_TYPES = ("custom_line_item", "invoice_line_item")
EMAIL_TYPES = ("credit_note", "none")
CREATE_PARAMS = frozenset(
    {
        "invoice",
        "amount",
        "lines",
        "refund_amount",
        "refunds",
        "credit_amount",
        "out_of_band_amount",
        "reason",
        "memo",
        "metadata",
        "effective_at",
        "email_type",
        "shipping_cost",
    }
)
_LINE_PARAMS = frozenset({"type", "amount", "description", "invoice_line_item", "metadata", "quantity", "unit_amount"})
_UNSUPPORTED_LINE_PARAMS = ("tax_amounts", "tax_rates", "unit_amount_decimal")
_REFUND_PARAMS = frozenset({"type", "refund", "amount_refunded", "payment_record_refund"})


@dataclass(frozen=True)
class LineParams:
    """One entry of `lines`: an invoice line to credit (by amount or quantity), or a custom one."""

    type: str
    invoice_line_item: str | None
    amount: int | None
    quantity: int | None
    unit_amount: int | None
    description: str | None
    metadata: dict[str, str] | None


@dataclass(frozen=True)
class RefundLink:
    """One entry of `refunds`: an existing refund to link, and how much of it (None: all)."""

    refund: str
    amount_refunded: int | None


@dataclass(frozen=True)
class CreditNoteParams:
    invoice: str
    amount: int | None
    lines: tuple[LineParams, ...]
    refund_amount: int | None
    refunds: tuple[RefundLink, ...]
    credit_amount: int | None
    out_of_band_amount: int | None
    reason: str | None
    memo: str | None
    metadata: dict[str, str]
    effective_at: int | None


def _optional_int(params: dict[str, Any], name: str, minimum: int) -> int | None:
    return None if params.get(name) is None else as_int(params[name], name, minimum)


def _string(value: Any, param: str) -> str | None:
    if value is not None and not isinstance(value, str):
        raise invalid_param(f"Invalid string: {value!r}", param=param)
    return value


def _only_for(line: dict[str, Any], prefix: str, names: tuple[str, ...], kind: str) -> None:
    for name in names:
        if line.get(name) is not None:
            raise invalid_param(
                f"{prefix}[{name}] is only valid when {prefix}[type] is {kind}.", param=f"{prefix}[{name}]"
            )


def _line(index: int, line: Any) -> LineParams:
    prefix = f"lines[{index}]"
    if not isinstance(line, dict):
        raise invalid_param(f"Invalid {prefix}: must be a hash.", param=prefix)
    for name in _UNSUPPORTED_LINE_PARAMS:
        if line.get(name) not in (None, ""):
            raise invalid_param(
                f"The emulator's invoices carry no tax: {prefix}[{name}] is not supported.", param=f"{prefix}[{name}]"
            )
    reject_unknown(
        {f"{prefix}[{k}]": v for k, v in line.items() if k not in _LINE_PARAMS and k not in _UNSUPPORTED_LINE_PARAMS}
    )
    if line.get("type") is None:
        raise missing(f"{prefix}[type]")
    kind = one_of(line["type"], LINE_TYPES, f"{prefix}[type]")
    quantity = None if line.get("quantity") is None else as_int(line["quantity"], f"{prefix}[quantity]", 1)
    metadata = None if line.get("metadata") is None else metadata_of(line["metadata"], f"{prefix}[metadata]")
    if kind == "invoice_line_item":
        _only_for(line, prefix, ("description", "unit_amount"), "custom_line_item")
        if not isinstance(line.get("invoice_line_item"), str) or not line["invoice_line_item"]:
            raise missing(f"{prefix}[invoice_line_item]")
        amount = None if line.get("amount") is None else as_int(line["amount"], f"{prefix}[amount]", 1)
        if (amount is None) == (quantity is None):
            raise invalid_param(f"Pass one of {prefix}[amount] or {prefix}[quantity].", param=f"{prefix}[amount]")
        return LineParams(kind, line["invoice_line_item"], amount, quantity, None, None, metadata)
    _only_for(line, prefix, ("amount", "invoice_line_item"), "invoice_line_item")
    if line.get("unit_amount") is None:
        raise missing(f"{prefix}[unit_amount]")
    unit_amount = as_int(line["unit_amount"], f"{prefix}[unit_amount]", 1)
    description = _string(line.get("description"), f"{prefix}[description]")
    return LineParams(kind, None, None, quantity or 1, unit_amount, description, metadata)


def _refund(index: int, link: Any) -> RefundLink:
    prefix = f"refunds[{index}]"
    if not isinstance(link, dict):
        raise invalid_param(f"Invalid {prefix}: must be a hash.", param=prefix)
    reject_unknown({f"{prefix}[{k}]": v for k, v in link.items() if k not in _REFUND_PARAMS})
    kind = one_of(link.get("type", "refund"), ("payment_record_refund", "refund"), f"{prefix}[type]")
    if kind == "payment_record_refund" or link.get("payment_record_refund") is not None:
        raise invalid_param("The emulator has no payment records to link refunds from.", param=f"{prefix}[type]")
    if not isinstance(link.get("refund"), str) or not link["refund"]:
        raise missing(f"{prefix}[refund]")
    amount = link.get("amount_refunded")
    return RefundLink(link["refund"], None if amount is None else as_int(amount, f"{prefix}[amount_refunded]", 1))


def _array(value: Any, param: str) -> list[Any]:
    if value is None or value == "":
        return []
    if not isinstance(value, list):
        raise invalid_param(f"Invalid array: {param} must be an array.", param=param)
    return value


def parse(params: dict[str, Any]) -> CreditNoteParams:
    """The request's parameters, or the 400 Stripe answers before running it."""
    reject_unknown({k: v for k, v in params.items() if k not in CREATE_PARAMS})
    invoice = params.get("invoice")
    if not isinstance(invoice, str) or not invoice:
        raise missing("invoice")
    if params.get("shipping_cost") is not None:
        raise invalid_param("The emulator's invoices have no shipping: shipping_cost is not supported.")
    if params.get("email_type") is not None:  # accepted; the emulator sends no email
        one_of(params["email_type"], EMAIL_TYPES, "email_type")
    lines = tuple(_line(i, line) for i, line in enumerate(_array(params.get("lines"), "lines")))
    refunds = tuple(_refund(i, link) for i, link in enumerate(_array(params.get("refunds"), "refunds")))
    amount = _optional_int(params, "amount", 1)
    if amount is None and not lines:
        raise invalid_param("One of amount, lines, or shipping_cost must be provided.", param="amount")
    refund_amount = _optional_int(params, "refund_amount", 0)
    if refund_amount and refunds:
        raise invalid_param("Pass either refund_amount or refunds, not both.", param="refunds")
    reason = params.get("reason")
    return CreditNoteParams(
        invoice=invoice,
        amount=amount,
        lines=lines,
        refund_amount=refund_amount,
        refunds=refunds,
        credit_amount=_optional_int(params, "credit_amount", 0),
        out_of_band_amount=_optional_int(params, "out_of_band_amount", 0),
        reason=None if reason is None else one_of(reason, REASONS, "reason"),
        memo=_string(params.get("memo"), "memo"),
        metadata=metadata_of(params.get("metadata"), "metadata"),
        effective_at=_optional_int(params, "effective_at", 0),
    )
