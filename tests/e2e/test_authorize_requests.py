"""What an authorization request may carry and what a registered redirect URI may hold:
hosts a browser goes to as the consent page names them, no response parameter registered
in advance, S256 challenges of a SHA-256's shape, response modes and request objects this
server does not answer in refused rather than ignored, and a code that is another client's
unknown whatever the client."""

from __future__ import annotations

import pytest

from service import events as ev
from service.app import CONTEXT
from service.domain import streams
from service.eventlog import Metadata
from service.oauth import tokens
from tests.e2e.oauth_helpers import (
    authorize_url,
    code_for,
    consent,
    hidden_fields,
    new_app,
    pkce,
    query_of,
    sign_in,
)
from tests.e2e.test_native_apps import public_app


async def registered(client, company, uri: str):
    body = {"name": "a", "grant_type": "authorization_code", "redirect_uri": uri,
            "permissions": ["invoices:read"], "ip_allowlist": []}  # fmt: skip
    return await client.post("/admin/applications", json=body, headers=company.auth)


@pytest.mark.parametrize(
    "uri",
    [
        # browsers read "\" as "/": this one goes to attacker.example
        "https://attacker.example\\.bank.example/cb",
        "https://app.example/cb\\x",
        "https://a\u200b.example/cb",  # a host IDNA 2008 refuses
        "https://app.example.\u3002/cb",  # an empty label
        "https://app%2eexample/cb",  # a percent-encoded host, decoded by browsers
        "https://*.example/cb",
        "https://[fe80::1%25eth0]/cb",  # a zone names no address of a network
        "https://0x7f.1/cb",  # browsers read a host ending in a number as IPv4: 127.0.0.1
        "https://3232235777/cb",  # 192.168.1.1
        "https://1.2.3/cb",  # 1.2.0.3
        "https://xn--zz.example/cb",  # punycode that decodes to nothing
        "https://xn--a.example/cb",  # to a control character
    ],
)
async def test_a_redirect_uri_whose_host_a_browser_would_not_go_to_as_named_is_refused(
    client, company, uri
):
    response = await registered(client, company, uri)
    assert response.status == 400, uri
    body = await response.json()
    assert body["error"] == "invalid_request"
    assert "redirect_uri" in body["error_description"]


@pytest.mark.parametrize(
    "uri",
    ["https://\u00e9cole.example/cb", "https://[2001:db8::1]/cb", "http://[::1]:8080/cb",
     "https://app.example/cb?tenant=7&x", "https://xn--fa-hia.de/cb", "https://192.0.2.7/cb",
     "https://app.example./cb", "https://app.b1/cb"],
)  # fmt: skip
async def test_hosts_and_queries_of_every_valid_kind_are_still_taken(client, company, uri):
    response = await registered(client, company, uri)
    assert response.status == 201, await response.text()


@pytest.mark.parametrize(
    "name", ["code", "state", "iss", "error", "error_description", "error_uri"]
)
async def test_a_redirect_uri_may_not_hold_a_parameter_the_answer_adds(client, company, name):
    """RFC 6749 §3.1: response parameters MUST NOT be included more than once."""
    response = await registered(client, company, f"https://app.example/cb?{name}=x")
    assert response.status == 400
    assert name in (await response.json())["error_description"]


async def test_a_redirect_uri_registered_before_the_rule_is_an_error_page_not_a_500(
    client, company, db
):
    """One already in the log: the request stops at a page, before any code is recorded."""
    app = await new_app(client, company, grant_type="authorization_code", ip_allowlist=[])
    await sign_in(client, company.admin_email, company.admin_password, authorize_url(app))
    bad = "https://attacker.example\\.bank.example/cb"
    ctx = client.app[CONTEXT]
    stream = streams.application(app["client_id"])
    await ctx.eventlog.append(
        stream,
        await ctx.eventlog.stream_version(stream),
        [ev.RedirectUriChanged(company.company_id, app["client_id"], app["redirect_uri"], bad)],
        Metadata(),
    )
    await ctx.lookups.catch_up()
    url = authorize_url(app | {"redirect_uri": bad})
    before = await db.pool.fetchval("SELECT count(*) FROM events")
    response = await client.get(url, allow_redirects=False)
    assert response.status == 400
    assert "Location" not in response.headers
    assert "redirect URI" in await response.text()
    form = {"client_id": app["client_id"], "redirect_uri": bad, "state": "s",
            "decision": "approve", "csrf_token": "x"}  # fmt: skip
    posted = await client.post("/oauth/authorize", data=form, allow_redirects=False)
    assert posted.status in (400, 403)
    assert await db.pool.fetchval("SELECT count(*) FROM events") == before


@pytest.mark.parametrize(
    "challenge",
    [
        "a" * 100,  # the length of no SHA-256
        "a" * 42 + ".",  # "." and "~" are a verifier's characters, not base64url's
        "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMN~_-",
        "a" * 42 + "B",  # 43 characters, but its last 4 bits are not zero: no 32 bytes
        "a" * 42 + "A\n",  # a line's end after a good one: never the SHA-256 a verifier has
    ],
)
async def test_an_s256_challenge_that_cannot_be_a_sha256_is_refused_at_once(
    client, company, challenge
):
    """RFC 7636 §4.2 and §4.4.1: its code could never be redeemed."""
    app = await new_app(client, company, grant_type="authorization_code", ip_allowlist=[])
    url = authorize_url(app, challenge=challenge, state="st")
    await sign_in(client, company.admin_email, company.admin_password, url)
    response = await client.get(url, allow_redirects=False)
    assert response.status == 302
    params = query_of(response.headers["Location"])
    assert params["error"] == "invalid_request"
    assert params["state"] == "st"


async def test_a_real_s256_challenge_is_taken(client, company):
    app = await new_app(client, company, grant_type="authorization_code", ip_allowlist=[])
    await sign_in(client, company.admin_email, company.admin_password, authorize_url(app))
    for _ in range(8):  # challenges that end in several of the 16 characters allowed
        _, challenge = pkce()
        assert "code=" in await consent(client, authorize_url(app, challenge=challenge))


@pytest.mark.parametrize(
    ("extra", "error"),
    [
        ({"response_mode": "form_post"}, "invalid_request"),
        ({"response_mode": "fragment"}, "invalid_request"),
        ({"request": "eyJhbGciOiJub25lIn0.e30."}, "request_not_supported"),
        ({"request_uri": "urn:ietf:params:oauth:request_uri:x"}, "request_uri_not_supported"),
    ],
)
async def test_a_response_mode_or_request_object_this_server_cannot_honour_is_refused(
    client, company, extra, error
):
    """A client that asked for the code outside the query, or signed its parameters, does
    not get an answer that ignored what it asked for."""
    app = await new_app(client, company, grant_type="authorization_code", ip_allowlist=[])
    url = authorize_url(app, state="st", **extra)
    await sign_in(client, company.admin_email, company.admin_password, url)
    response = await client.get(url, allow_redirects=False)
    assert response.status == 302
    params = query_of(response.headers["Location"])
    assert params["error"] == error
    assert params["state"] == "st"
    assert "code" not in params


async def test_response_mode_query_is_the_default_spelled_out(client, company):
    app = await new_app(client, company, grant_type="authorization_code", ip_allowlist=[])
    url = authorize_url(app, response_mode="query")
    await sign_in(client, company.admin_email, company.admin_password, url)
    assert "code=" in await consent(client, url)


async def test_another_clients_code_is_unknown_to_a_public_client(client, company):
    """RFC 6749 §4.1.3: a code issued to another client gets the answer an unknown code
    gets, not one that tells it exists (that one was issued without PKCE)."""
    owner = await new_app(client, company, grant_type="authorization_code", ip_allowlist=[])
    code = await code_for(client, company, owner)
    public = await public_app(client, company)
    answers = []
    for presented in (code, tokens.new(tokens.CODE)):  # another's, and none at all
        response = await client.post(
            "/oauth/token",
            data={"grant_type": "authorization_code", "client_id": public["client_id"],
                  "code": presented, "redirect_uri": public["redirect_uri"],
                  "code_verifier": "v" * 43},
        )  # fmt: skip
        assert response.status == 400
        answers.append(await response.json())
    assert answers[0] == answers[1]
    assert answers[0]["error_description"] == "unknown, expired or spent authorization code"


@pytest.mark.parametrize(
    ("host", "written"), [("fa\u00df.de", "xn--fa-hia.de"), ("\u00df.example", "xn--zca.example")]
)
async def test_the_consent_page_and_its_policy_name_the_host_the_answer_goes_to(
    client, company, host, written
):
    """IDNA 2003 (Python's codec) writes fa\u00df.de as fass.de, another name; the answer's
    Location, like browsers, as xn--fa-hia.de. The page and its form-action named fass.de."""
    app = await new_app(client, company, grant_type="authorization_code", ip_allowlist=[],
                        redirect_uri=f"https://{host}/cb")  # fmt: skip
    url = authorize_url(app, state="st")
    await sign_in(client, company.admin_email, company.admin_password, url)
    page = await client.get(url)
    assert page.status == 200
    assert f"({written})" in await page.text()
    assert f"https://{written}" in page.headers["Content-Security-Policy"]
    denied = await client.post(
        "/oauth/authorize",
        data={**hidden_fields(await page.text()), "decision": "deny"},
        allow_redirects=False,
    )
    assert denied.status == 302
    assert denied.headers["Location"].startswith(f"https://{written}/cb?")
