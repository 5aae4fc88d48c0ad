"""python -m tools.localstripe --port 8420 [--from-scratch] [--host 127.0.0.1] [--webhook-retry-s 0]
[--webhook-late-s 0] [--webhook-duplicates 0] [--webhook-seed 0]"""

from __future__ import annotations

import argparse
import logging

from aiohttp import web

from tools.localstripe import webhooks
from tools.localstripe.app import build_app, listen, use_store


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m tools.localstripe", description="localstripe with InvoiceService's Stripe calls."
    )
    parser.add_argument("--port", type=int, default=8420)
    parser.add_argument(
        "--from-scratch",
        action="store_true",
        help="neither load nor save the state localstripe keeps in /tmp/localstripe.pickle",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (localstripe itself uses ::)")
    parser.add_argument(
        "--webhook-retry-s",
        type=float,
        default=0.0,
        help="retry a webhook delivery not answered 2xx for this long, as Stripe does (default: send it once)",
    )
    parser.add_argument(
        "--webhook-late-s",
        type=float,
        default=0.0,
        help="delay each event up to this much more, so that events arrive out of order, as on Stripe",
    )
    parser.add_argument(
        "--webhook-duplicates",
        type=float,
        default=0.0,
        help="the share of events sent twice, as Stripe may (0 to 1)",
    )
    parser.add_argument("--webhook-seed", type=int, default=0, help="the seed of the lateness and the duplicates")
    args = parser.parse_args(argv)

    app = build_app(public_base=f"http://127.0.0.1:{args.port}")
    use_store(from_scratch=args.from_scratch)
    disorder = webhooks.Disorder(args.webhook_late_s, args.webhook_duplicates, args.webhook_seed)
    webhooks.patch(args.webhook_retry_s, disorder)
    access = logging.getLogger("aiohttp.access")  # localstripe logs webhook deliveries here too
    access.setLevel(logging.DEBUG)
    access.addHandler(logging.StreamHandler())
    web.run_app(app, sock=listen(args.host, args.port), access_log=access)


if __name__ == "__main__":
    main()
