"""Stripe customers with cards, made as a dashboard user makes them: for the tests, the
benchmark and the chaos scenarios, and the demo customer `make run` prepares in its
emulator so that a newcomer's first Create has a customer and a card to bill.
Talks to Stripe (in practice the emulator) only; knows nothing of the service."""

from __future__ import annotations

import asyncio
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import stripe

from service import payments

# The emulator takes raw card numbers; real Stripe wants tokens (pm_card_visa).
VISA = "4242424242424242"
# Attaches, then every charge with it is declined (Stripe's test card of that behaviour).
DECLINED_ON_CHARGE = "4000000000000341"


async def attach_card(client: stripe.StripeClient, customer: str, number: str) -> str:
    """A card payment method attached to `customer`; its id."""
    card: Any = {"number": number, "exp_month": 12, "exp_year": 2030, "cvc": "123"}
    method = await client.v1.payment_methods.create_async({"type": "card", "card": card})
    if method.id is None:
        raise RuntimeError("the emulator answered a payment method without an id")
    await client.v1.payment_methods.attach_async(method.id, {"customer": customer})
    return method.id


async def customer_with_card(client: stripe.StripeClient, number: str = VISA) -> tuple[str, str]:
    """A Stripe customer with an attached card payment method, as a dashboard user makes."""
    customer = await client.v1.customers.create_async({"name": "John Doe", "email": "john.doe@mail.com"})
    if customer.id is None:
        raise RuntimeError("the emulator answered a customer without an id")
    return customer.id, await attach_card(client, customer.id, number)


@dataclass(frozen=True)
class Demo:
    """What `make run` prepares: the README's quick start reads it from DEMO_FILE with jq."""

    customer: str
    card: str
    declining_card: str


# Under DATA_DIR, beside the dev key.
DEMO_FILE = "demo.json"


def prepare_demo(api_base: str, api_key: str, data_dir: Path) -> Demo:
    """A customer with a card that pays and one that is declined on charge, written to
    DATA_DIR/demo.json (the emulator starts empty on every `make run`, so are they)."""

    async def make() -> Demo:
        client = payments.client(api_key, api_base=api_base, timeout_s=10, max_retries=2)
        customer, card = await customer_with_card(client)
        return Demo(customer, card, await attach_card(client, customer, DECLINED_ON_CHARGE))

    demo = asyncio.run(make())
    data_dir.mkdir(parents=True, exist_ok=True)
    (data_dir / DEMO_FILE).write_text(json.dumps(asdict(demo), indent=2) + "\n")
    return demo
