"""The one localstripe this package is written against, and the guard that refuses any other.

The package patches localstripe's classes and routes by name and relies on their private
details (Invoice._finalize, InvoiceItem._api_list_all, resources.extra_apis, ...); another
version could change any of them silently, so nothing is patched unless the installed
version is the one pinned in pyproject.toml (tests/test_localstripe.py checks the two agree).
"""

from __future__ import annotations

import importlib.metadata

PINNED = "1.15.10"


def check() -> None:
    """Raises RuntimeError, naming both versions, unless localstripe PINNED is installed."""
    try:
        installed = importlib.metadata.version("localstripe")
    except importlib.metadata.PackageNotFoundError:
        raise RuntimeError(
            f"tools.localstripe extends localstripe {PINNED}, which is not installed (pip install -e '.[dev]')"
        ) from None
    if installed != PINNED:
        raise RuntimeError(
            f"tools.localstripe extends localstripe {PINNED} (pinned in pyproject.toml), "
            f"but localstripe {installed} is installed: reinstall {PINNED}, or review every patch "
            "against the new version before changing the pin"
        )
