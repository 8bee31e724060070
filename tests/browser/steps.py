"""Steps the browser tests share: the client application, signing in, arriving at the
callback, and axe-core over a page."""

from __future__ import annotations

from dataclasses import dataclass, field

from aiohttp.test_utils import TestClient
from axe_playwright_python.async_playwright import Axe
from playwright.async_api import Page

from tests.e2e.oauth_helpers import authorize_url, basic

# How long to wait for a page or a navigation: a bound on a hang, not a performance claim.
WAIT_MS = 15_000


@dataclass
class Console:
    """What the page said on its console: a blocked redirect shows up here as a CSP
    violation, the only trace it leaves."""

    lines: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        return "\n".join(self.lines) or "(nothing on the console)"


@dataclass
class Callback:
    """The client application's redirect URI: records every query it receives."""

    url: str
    received: list[dict[str, str]]


@dataclass
class Client:
    """An authorization_code application registered with the callback as redirect URI."""

    app: dict
    verifier: str
    challenge: str

    @property
    def client_id(self) -> str:
        return self.app["client_id"]

    @property
    def redirect_uri(self) -> str:
        return self.app["redirect_uri"]

    def authorize_path(self, state: str, **extra: str) -> str:
        return authorize_url(self.app, state=state, challenge=self.challenge, **extra)

    async def exchange(self, client: TestClient, code: str):
        return await client.post(
            "/oauth/token",
            data={
                "grant_type": "authorization_code",
                "code": code,
                "redirect_uri": self.redirect_uri,
                "code_verifier": self.verifier,
            },
            headers=basic(self.client_id, self.app["client_secret"]),
        )


# --- helpers -------------------------------------------------------------------------


async def sign_in(page: Page, email: str, password: str) -> None:
    await page.get_by_label("Email").fill(email)
    await page.get_by_label("Password").fill(password)
    await page.get_by_role("button", name="Sign in").click()


async def arrive(page: Page, url: str, console: Console) -> None:
    """Wait for the browser to reach `url`; if it stays put, say where and why."""
    try:
        await page.wait_for_url(lambda at: at.startswith(url), timeout=WAIT_MS)
    except Exception as exc:
        raise AssertionError(
            f"the browser never reached {url}; it stayed on {page.url}.\nConsole:\n{console}"
        ) from exc


async def accessible(page: Page) -> None:
    """axe-core over the page as it is shown; zero violations, else each one printed.
    The script goes in over the DevTools protocol, which the page's CSP does not govern,
    so the page keeps its real policy."""
    results = await Axe().run(page)
    violations = results.response["violations"]
    report = "\n".join(
        f"{v['id']} ({v['impact']}): {v['help']}\n"
        + "\n".join(f"    {node['target']}: {node['failureSummary']}" for node in v["nodes"])
        for v in violations
    )
    assert not violations, f"axe-core found problems on {page.url}:\n{report}"
