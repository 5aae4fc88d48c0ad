"""Puts it together: install() patches localstripe in place, build_app() adds the
middlewares and test hooks to localstripe's aiohttp app, listen() opens its socket."""

from __future__ import annotations

import importlib
import socket
import sys
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Middleware

from tools.localstripe import (
    credit_notes,
    customers,
    errors,
    invoice_items,
    invoice_lifecycle,
    invoice_payments,
    invoices,
    payment_methods,
    refunds,
    shapes,
    store_index,
    version,
)
from tools.localstripe.config import HOOKS, Hooks, add_routes
from tools.localstripe.recorder import Recorder
from tools.localstripe.stock import resources, set_route

DEFAULT_PUBLIC_BASE = "http://127.0.0.1:8420"
# Patching is done to localstripe's own module, which is global by its design; the mark
# of it lives there too (the public base the invoice links were installed with).
_INSTALLED = "_invoice_service_public_base"


def install(public_base: str = DEFAULT_PUBLIC_BASE) -> None:
    """Patches localstripe.resources in place. Must run before localstripe.server is
    imported; `public_base` is where the emulator is reachable (the base of the
    invoice_pdf/hosted_invoice_url links)."""
    version.check()
    installed = getattr(resources, _INSTALLED, None)
    if installed is not None:
        if installed != public_base:
            raise RuntimeError(f"localstripe is already patched for {installed}, not {public_base}")
        return
    if "localstripe.server" in sys.modules:
        raise RuntimeError("localstripe.server was imported before tools.localstripe could patch its routes")
    store_index.patch()
    errors.patch()
    invoices.patch()
    invoice_lifecycle.patch()
    invoice_items.patch()
    customers.patch()
    payment_methods.patch()
    refunds.patch()
    credit_notes.patch()
    shapes.patch()

    # Only the routes change: localstripe's subscriptions keep calling the stock
    # Invoice._api_pay_invoice, which must not raise on a decline.
    lifecycle = invoice_lifecycle.Lifecycle(public_base)
    set_route("POST", "/v1/invoices/{id}/finalize", lifecycle.finalize_invoice)
    set_route("POST", "/v1/invoices/{id}/add_lines", invoices.add_lines)
    set_route("POST", "/v1/invoices/{id}/pay", lifecycle.pay_invoice)
    set_route("POST", "/v1/invoices/{id}/void", invoice_lifecycle.void_invoice)
    set_route("POST", "/v1/invoices/{id}/mark_uncollectible", invoice_lifecycle.mark_uncollectible)
    attach = payment_methods.attach_with(resources.PaymentMethod._api_attach)
    set_route("POST", "/v1/payment_methods/{id}/attach", attach)
    notes = credit_notes.CreditNotes(public_base)
    set_route("GET", "/v1/invoice_payments", invoice_payments.list_payments)
    set_route("POST", "/v1/credit_notes", notes.create)
    set_route("GET", "/v1/credit_notes", credit_notes.list_notes)
    set_route("GET", "/v1/credit_notes/preview", notes.preview)  # before {id}, which would take it
    set_route("GET", "/v1/credit_notes/{id}", credit_notes.retrieve)
    set_route("POST", "/v1/credit_notes/{id}", credit_notes.update)
    set_route("POST", "/v1/credit_notes/{id}/void", credit_notes.void)
    set_route("GET", "/v1/credit_notes/{id}/lines", credit_notes.list_lines)
    setattr(resources, _INSTALLED, public_base)


def build_app(public_base: str = DEFAULT_PUBLIC_BASE) -> web.Application:
    """localstripe's aiohttp app, patched, with the middlewares added (not started yet).
    The app is localstripe.server's module-level one (its routes are registered at import)."""
    install(public_base)
    server: Any = importlib.import_module("localstripe.server")
    app: web.Application = server.app
    if HOOKS in app:
        return app
    hooks = app[HOOKS] = Hooks()
    # Stock order: errors, auth, store saving. Ours go after auth, so an unauthenticated
    # call is never counted, remembered or replayed; calls are counted before the
    # idempotency layer (replays count), faults come inside it (their 500s are saved),
    # and races inside those (a replay or a fault runs no race).
    position = app.middlewares.index(server.auth_middleware) + 1
    ours: list[Middleware] = [
        hooks.calls.middleware,
        hooks.idempotency.middleware,
        hooks.faults.middleware,
        hooks.races.middleware,
        errors.stripe_shaped_errors,
    ]
    recorder = Recorder.from_env()
    if recorder is not None:  # outermost of ours: it sees replays and faults as the caller does
        recorder.record_events()
        ours.insert(0, recorder.middleware)
    for offset, middleware in enumerate(ours):
        app.middlewares.insert(position + offset, middleware)
    add_routes(app)
    return app


def use_store(*, from_scratch: bool) -> None:
    """localstripe's store (global by its design): `from_scratch` neither loads nor saves
    it, otherwise it is loaded from localstripe's pickle."""
    if from_scratch:
        # Stock localstripe pickles its whole store on every write, to one file shared by
        # all instances: each call costs O(objects) (89% of its time by 400 invoices, seen
        # with py-spy) and parallel emulators overwrite each other's file.
        resources.Store.dump_to_disk = lambda self: None
    else:
        resources.store.try_load_from_disk()
        for obj in resources.store.values():  # invoices pickled by stock localstripe
            if isinstance(obj, resources.Invoice):
                obj.__dict__.pop("starting_balance", None)  # its inverted snapshots would be
                obj.__dict__.pop("ending_balance", None)  # exported over Stripe's fields


def listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    return sock
