"""Browser wiring: one headless Chromium (Debian's) for the session, a fresh context per
test, the service on a real port, and the client application's callback server."""

from __future__ import annotations

import html
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from playwright.async_api import Browser, BrowserContext, Page, async_playwright

from tests.browser.steps import WAIT_MS, Callback, Client, Console
from tests.conftest import Company
from tests.e2e.oauth_helpers import new_app, pkce

CHROMIUM = Path("/usr/bin/chromium")
# No sandbox (containers), no GPU; and nothing that phones home: the machine has no
# outside network, and Chromium's background services would flood refused connections.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-default-apps",
    "--disable-extensions",
]


@pytest.fixture(scope="session")
async def browser() -> AsyncIterator[Browser]:
    if not CHROMIUM.exists():
        pytest.fail(
            f"{CHROMIUM} is missing: the browser tests drive Debian's Chromium. "
            "Run `make browser` (it apt-get installs chromium), then run the tests again.",
            pytrace=False,
        )
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True
        )
        try:
            yield launched
        finally:
            await launched.close()


@pytest.fixture
def service_url(client: TestClient) -> str:
    return str(client.make_url("")).rstrip("/")


@pytest.fixture
async def context(browser: Browser, service_url: str) -> AsyncIterator[BrowserContext]:
    """A fresh profile (no cookies) under the pages' real CSP: never bypass_csp here, the
    flows must prove that Chromium itself lets the browser reach the application."""
    made = await browser.new_context(base_url=service_url)
    made.set_default_timeout(WAIT_MS)
    made.set_default_navigation_timeout(WAIT_MS)
    try:
        yield made
    finally:
        await made.close()


@pytest.fixture
async def console() -> Console:
    return Console()


@pytest.fixture
async def page(context: BrowserContext, console: Console) -> Page:
    opened = await context.new_page()
    opened.on("console", lambda message: console.lines.append(message.text))
    return opened


# --- the client application ------------------------------------------------------------


@pytest.fixture
async def callback() -> AsyncIterator[Callback]:
    received: list[dict[str, str]] = []

    async def land(request: web.Request) -> web.Response:
        received.append(dict(request.query))
        return web.Response(
            text='<!doctype html><html lang="en"><head><title>Callback</title></head>'
            f"<body><main><h1>Back at the application</h1><p>{html.escape(request.query_string)}"
            "</p></main></body></html>",
            content_type="text/html",
        )

    app = web.Application()
    app.router.add_get("/callback", land)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        yield Callback(str(server.make_url("/callback")), received)
    finally:
        await server.close()


@pytest.fixture
async def oauth_client(client: TestClient, company: Company, callback: Callback) -> Client:
    app = await new_app(
        client,
        company,
        name="Invoice Sync",
        grant_type="authorization_code",
        ip_allowlist=[],
        redirect_uri=callback.url,
    )
    verifier, challenge = pkce()
    return Client(app, verifier, challenge)
