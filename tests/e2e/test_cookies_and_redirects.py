"""A login-CSRF cookie the service did not issue (bytes that are not UTF-8, the wrong
shape) counts as no cookie, never a 500; redirects carry X-Request-Id and are logged."""

from __future__ import annotations

import asyncio
import html
import re
from dataclasses import dataclass
from http.cookies import SimpleCookie
from urllib.parse import quote_from_bytes

import pytest
import structlog

from tests.conftest import Company
from tests.e2e.oauth_helpers import authorize_url, new_app, sign_in

# credentials.random_token(24): 24 random bytes in base64url without padding.
ISSUED = re.compile(r"[A-Za-z0-9_-]{32}")

# Not UTF-8; short; one character too long; the right length with a character outside
# base64url. Each must be treated exactly as a missing cookie.
MALFORMED = [b"\xff\xfe", b"a" * 32 + b"\xff", b"abc", b"A" * 33, b"A" * 31 + b"."]


@dataclass
class Raw:
    status: int
    headers: list[tuple[str, str]]
    body: str

    def cookie(self, name: str) -> str | None:
        for key, value in self.headers:
            if key.lower() == "set-cookie" and value.startswith(name + "="):
                return SimpleCookie(value)[name].value
        return None


async def raw(client, method: str, target: str, cookie: bytes, form: bytes = b"") -> Raw:
    """One request written as bytes on the wire: the test client would re-encode a cookie
    that is not UTF-8 as UTF-8, which is not what a browser holding such a cookie sends."""
    reader, writer = await asyncio.open_connection(client.host, client.port)
    head = (
        f"{method} {target} HTTP/1.1\r\nHost: {client.host}\r\nConnection: close\r\n"
        "Content-Type: application/x-www-form-urlencoded\r\n"
        f"Content-Length: {len(form)}\r\n"
    ).encode()
    writer.write(head + b"Cookie: " + cookie + b"\r\n\r\n" + form)
    await writer.drain()
    answer = await reader.read()
    writer.close()
    head_bytes, _, body = answer.partition(b"\r\n\r\n")
    status_line, *lines = head_bytes.decode("latin-1").split("\r\n")
    headers = [(k, v.strip()) for k, _, v in (line.partition(":") for line in lines)]
    return Raw(int(status_line.split()[1]), headers, body.decode("utf-8", "replace"))


def hidden_csrf(text: str) -> str:
    match = re.search(r'name="csrf_token" value="([^"]*)"', text)
    assert match, text
    return html.unescape(match.group(1))


async def sessions_count(db) -> int:
    return await db.pool.fetchval("SELECT count(*) FROM web_sessions")


async def authorize_page(client, company: Company) -> str:
    """The path of a valid authorization request, which shows the sign-in form."""
    app = await new_app(client, company, grant_type="authorization_code", ip_allowlist=[])
    return authorize_url(app)


# --- the login-CSRF cookie -----------------------------------------------------------


@pytest.mark.parametrize("value", MALFORMED)
@pytest.mark.parametrize("page", ["authorize", "dashboard"])
async def test_a_malformed_login_csrf_cookie_is_replaced_with_a_fresh_one(
    client, company, page, value
):
    if page == "authorize":
        target, name = await authorize_page(client, company), "tg_login_csrf"
    else:
        target, name = "/dashboard", "tg_dashboard_csrf"
    response = await raw(client, "GET", target, name.encode() + b"=" + value)
    assert response.status == 200, response.body
    fresh = response.cookie(name)
    assert fresh is not None and ISSUED.fullmatch(fresh), response.headers
    assert hidden_csrf(response.body) == fresh


@pytest.mark.parametrize("value", MALFORMED)
@pytest.mark.parametrize("action", ["/oauth/login", "/dashboard/login"])
async def test_a_malformed_login_csrf_cookie_refuses_the_sign_in(
    client, company, db, action, value
):
    """The form echoes the cookie's own value, as a forger who set the cookie would: the
    right password still does not sign anyone in."""
    name = "tg_login_csrf" if action == "/oauth/login" else "tg_dashboard_csrf"
    next_url = await authorize_page(client, company)
    form = (
        f"email={quote_from_bytes(company.admin_email.encode())}"
        f"&password={quote_from_bytes(company.admin_password.encode())}"
        f"&next={quote_from_bytes(next_url.encode())}&csrf_token={quote_from_bytes(value)}"
    ).encode()
    before = await sessions_count(db)
    response = await raw(client, "POST", action, name.encode() + b"=" + value, form)
    assert response.status == 403, response.body
    assert response.cookie("tg_session") is None
    assert await sessions_count(db) == before


# --- redirects: X-Request-Id and one log line ----------------------------------------


def logged_once(logs: list[dict], path: str, status: int) -> None:
    lines = [entry for entry in logs if entry["event"] == "http.request"]
    assert len(lines) == 1, lines
    assert (lines[0]["path"], lines[0]["status"]) == (path, status)


async def test_a_redirect_back_to_the_application_has_a_request_id_and_a_log_line(client, company):
    app = await new_app(client, company, grant_type="authorization_code", ip_allowlist=[])
    await sign_in(client, company.admin_email, company.admin_password, authorize_url(app))
    with structlog.testing.capture_logs() as logs:
        response = await client.get(
            authorize_url(app, response_type="token"),
            headers={"X-Request-Id": "implicit-refused"},
            allow_redirects=False,
        )
    assert response.status == 302
    assert "error=unsupported_response_type" in response.headers["Location"]
    assert response.headers["X-Request-Id"] == "implicit-refused"
    logged_once(logs, "/oauth/authorize", 302)


async def test_signing_out_of_the_dashboard_has_a_request_id_and_a_log_line(client):
    with structlog.testing.capture_logs() as logs:
        response = await client.post("/dashboard/logout", data={}, allow_redirects=False)
    assert response.status == 303
    assert response.headers["Location"] == "/dashboard"
    assert re.fullmatch(r"[0-9a-f]{16}", response.headers["X-Request-Id"])
    logged_once(logs, "/dashboard/logout", 303)


async def test_signing_in_has_a_request_id_and_a_log_line(client, company):
    target = await authorize_page(client, company)
    csrf = hidden_csrf(await (await client.get(target)).text())
    form = {"email": company.admin_email, "password": company.admin_password,
            "next": target, "csrf_token": csrf}  # fmt: skip
    with structlog.testing.capture_logs() as logs:
        response = await client.post(
            "/oauth/login", data=form, headers={"X-Request-Id": "sign-in"}, allow_redirects=False
        )
    assert response.status == 303  # an issued cookie passes the shape check
    assert response.headers["X-Request-Id"] == "sign-in"
    assert "tg_session" in response.cookies  # the header is added, nothing taken away
    logged_once(logs, "/oauth/login", 303)


async def test_an_error_page_from_an_exception_is_still_json_and_logged_once(client):
    """A guard, not a defect: a raised 4xx becomes JSON in the request middleware, further
    in, so the request-context middleware sees a response and logs it once, as before."""
    with structlog.testing.capture_logs() as logs:
        response = await client.get("/oauth/switch-user", headers={"X-Request-Id": "wrong-method"})
    assert response.status == 405
    assert (await response.json())["error"] == "method_not_allowed"
    assert response.headers["X-Request-Id"] == "wrong-method"
    logged_once(logs, "/oauth/switch-user", 405)


async def test_cookies_are_secure_when_the_service_is_published_over_https(db, settings):
    """Behind a proxy that ends TLS the socket is plain http: PUBLIC_URL says https."""
    from tests.conftest import make_company
    from tests.e2e.test_gateway import start

    published = await start(db, settings, public_url="https://auth.example.com")
    try:
        company = await make_company(published, "Secure Co")
        signed = await published.post(
            "/session", json={"email": company.admin_email, "password": company.admin_password}
        )
        assert signed.status == 200
        assert "Secure" in signed.headers["Set-Cookie"]
        page = await published.get("/dashboard")
        assert all("Secure" in c for c in page.headers.getall("Set-Cookie"))
    finally:
        await published.close()


async def test_cookies_are_not_secure_on_plain_local_http(client, company):
    """`make run` serves http on 127.0.0.1: a Secure cookie would never come back."""
    signed = await client.post(
        "/session", json={"email": company.admin_email, "password": company.admin_password}
    )
    assert signed.status == 200
    assert "Secure" not in signed.headers["Set-Cookie"]
