"""The API page (GET /admin/api/docs, Swagger UI) through the session's real Envoy: its
files are served with their types and no key, and in a real browser (Debian's chromium,
headless, driven by Playwright) it lists every operation of the served OpenAPI document and
a person who authorizes with a key tries a Get and sees the invoice. The browser reaches
nothing but the gateway on loopback: any other request is aborted and fails the test."""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from playwright.async_api import Request, Route, async_playwright, expect

from gateway.render import API_PAGE
from service.storage import Storage
from tests.helpers import API_KEY, Stack, make_invoice, save_invoice

CHROMIUM = shutil.which("chromium")
PAGE = "/admin/api/docs"
TYPES = {
    PAGE: ("index.html", "text/html; charset=utf-8"),
    f"{PAGE}/init.js": ("init.js", "text/javascript; charset=utf-8"),
    f"{PAGE}/swagger-ui-bundle.js": ("swagger-ui-bundle.js", "text/javascript; charset=utf-8"),
    f"{PAGE}/swagger-ui.css": ("swagger-ui.css", "text/css; charset=utf-8"),
}
# Each step waits at most this long; the whole test takes a few seconds.
STEP_MS = 10_000


@pytest.mark.parametrize("path", list(TYPES))
async def test_each_file_of_the_page_is_served_with_its_type_and_no_key(stack: Stack, path: str) -> None:
    name, content_type = TYPES[path]
    async with httpx.AsyncClient(base_url=stack.base_url, timeout=10) as anonymous:
        reply = await anonymous.get(path)
    assert reply.status_code == 200, reply.text[:200]
    assert reply.headers.get_list("content-type") == [content_type]
    assert reply.headers["x-content-type-options"] == "nosniff"
    assert reply.content == API_PAGE[name].read_bytes()


async def test_the_page_with_a_trailing_slash_redirects_to_the_page(stack: Stack) -> None:
    async with httpx.AsyncClient(base_url=stack.base_url, timeout=10) as anonymous:
        reply = await anonymous.get(f"{PAGE}/")
    assert reply.status_code == 301
    assert urlsplit(reply.headers["location"]).path == PAGE


async def test_a_person_authorizes_and_tries_a_get_in_a_real_browser(
    stack: Stack, stack_store: Storage, tmp_path: Path
) -> None:
    assert CHROMIUM, "chromium is missing: `make debian-tools` installs it"
    saved = await save_invoice(stack_store, make_invoice(1))
    async with httpx.AsyncClient(base_url=stack.base_url, timeout=10) as anonymous:
        document = (await anonymous.get("/admin/api/openapi.json")).json()
    operations = {(method.upper(), path) for path, item in document["paths"].items() for method in item}
    assert ("GET", "/admin/api/invoices/{id}") in operations

    gateway = urlsplit(stack.base_url).netloc
    elsewhere: list[str] = []
    calls: list[Request] = []
    violations: list[str] = []

    async def only_the_gateway(route: Route) -> None:
        if urlsplit(route.request.url).netloc == gateway:
            await route.continue_()
        else:
            elsewhere.append(route.request.url)
            await route.abort("blockedbyclient")

    async with async_playwright() as playwright:
        # Host names resolve to nothing, so not even the browser's own background traffic
        # (which page routes do not see) leaves loopback.
        browser = await playwright.chromium.launch(
            executable_path=CHROMIUM, args=["--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1"]
        )
        try:
            context = await browser.new_context(viewport={"width": 1280, "height": 1600})
            await context.route("**/*", only_the_gateway)
            page = await context.new_page()
            page.on("request", lambda r: calls.append(r) if "/admin/api/invoices" in r.url else None)
            page.on("console", lambda m: violations.append(m.text) if "Content Security Policy" in m.text else None)
            await page.goto(f"{stack.base_url}{PAGE}", timeout=STEP_MS)

            listed = page.locator(".opblock")
            await expect(listed).to_have_count(len(operations), timeout=STEP_MS)
            shown = set()
            for block in await listed.all():
                method = await block.locator(".opblock-summary-method").inner_text()
                path = await block.locator(".opblock-summary-path").get_attribute("data-path")
                shown.add((method.strip().upper(), path))
            assert shown == operations

            await page.locator(".auth-wrapper button.authorize").click()
            dialog = page.locator(".dialog-ux")
            await dialog.locator("input").fill(API_KEY)
            await dialog.locator("button.authorize").click()
            await dialog.locator("button.btn-done").click()

            get = page.locator(".opblock").filter(has=page.locator('[data-path="/admin/api/invoices/{id}"]'))
            get = get.filter(has=page.locator(".opblock-summary-method", has_text=re.compile("^GET$")))
            await get.locator(".opblock-summary-control").click()
            await get.locator("button.try-out__btn").click()
            await get.locator('tr[data-param-name="id"] input').fill(saved.id)
            await get.locator("button.execute").click()

            answer = get.locator(".live-responses-table .response")
            await expect(answer.locator(".response-col_status")).to_have_text("200", timeout=STEP_MS)
            await expect(answer.locator(".response-col_description")).to_contain_text(saved.id, timeout=STEP_MS)
            [call] = [c for c in calls if c.url.endswith(f"/admin/api/invoices/{saved.id}")]
            assert (await call.all_headers()).get("api-key") == API_KEY
            screenshot = tmp_path / "api-page.png"
            await get.locator(".live-responses-table").scroll_into_view_if_needed()
            await page.screenshot(path=str(screenshot))
            print(f"screenshot: {screenshot}")
        finally:
            await browser.close()

    assert elsewhere == []
    assert violations == []
