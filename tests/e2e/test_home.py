"""`GET /`: a person who opens the service's address in a browser finds the way in; a
program still gets JSON."""

from __future__ import annotations

import re

import pytest

# what Chromium and Firefox send on a navigation
BROWSER_ACCEPTS = [
    "text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,image/webp,"
    "image/apng,*/*;q=0.8,application/signed-exchange;v=b3;q=0.7",
    "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8",
]


@pytest.mark.parametrize("accept", BROWSER_ACCEPTS)
async def test_a_browser_at_the_root_gets_a_page_that_links_the_dashboard(client, accept):
    response = await client.get("/", headers={"Accept": accept}, allow_redirects=False)
    assert response.status == 200
    assert response.content_type == "text/html"
    assert response.headers["Vary"] == "Accept"
    # the same hardening as every other page
    assert "frame-ancestors 'none'" in response.headers["Content-Security-Policy"]
    text = await response.text()
    links = re.findall(r'href="([^"]+)"', text)
    assert "/dashboard" in links
    assert "/.well-known/oauth-authorization-server" in links
    assert "A first walk through" in text
    for link in links:  # no dead link on the first page anyone sees
        linked = await client.get(link, allow_redirects=False)
        assert linked.status == 200, link


async def test_the_dashboard_link_leads_to_the_sign_in_form(client):
    page = await (await client.get("/", headers={"Accept": BROWSER_ACCEPTS[0]})).text()
    assert 'href="/dashboard"' in page
    dashboard = await (await client.get("/dashboard")).text()
    assert 'name="password"' in dashboard


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Accept": "*/*"},
        {"Accept": "application/json"},
        {"Accept": "text/html;q=0.5, application/json"},
    ],
    ids=["no-accept", "curl", "json", "json-preferred"],
)
async def test_a_program_at_the_root_gets_a_json_index(client, headers):
    response = await client.get("/", headers=headers, skip_auto_headers=["Accept"])
    assert response.status == 200
    assert response.content_type == "application/json"
    assert response.headers["Vary"] == "Accept"
    body = await response.json()
    assert body["service"] == "tollgate"
    assert body["links"]["dashboard"] == "/dashboard"
    metadata = await client.get(body["links"]["authorization_server_metadata"])
    assert metadata.status == 200
    assert "token_endpoint" in await metadata.json()


@pytest.mark.parametrize(
    "accept",
    [
        "text/html;q=nan",
        "text/html;q=",
        "text/html;q",
        ";;,,",
        "text/html;q=1e999",
        "\u00e9/\u00e9",
    ],
)
async def test_a_malformed_accept_header_still_gets_an_answer(client, accept):
    response = await client.get("/", headers={"Accept": accept})
    assert response.status == 200
    assert response.content_type in ("text/html", "application/json")


async def test_only_get_and_head_are_served_at_the_root(client):
    assert (await client.head("/")).status == 200
    response = await client.post("/", data=b"x")
    assert response.status == 405
    assert (await response.json())["error"] == "method_not_allowed"
