"""The application page's "Client authentication" section over real HTTP: the method, the
DPoP requirement, the live-token limit, and private_key_jwt's public keys pasted as a JWK
or a JWK Set (a private key refused, never shown back, logged or recorded), each change
through the admin API's command handlers and recorded as the same events."""

from __future__ import annotations

import html
import json
import re
from urllib.parse import quote

import pytest
import structlog
from joserfc.jwk import ECKey, RSAKey

from service.app import CONTEXT
from tests.e2e.oauth_helpers import cc_token, new_app
from tests.e2e.test_dashboard import hidden, sign_in
from tests.e2e.test_dpop import cc_request, proof
from tests.e2e.test_private_key_jwt import assertion, jwks, token_request

RSA = RSAKey.generate_key(2048, parameters={"kid": "team/rsa-1"})
EC = ECKey.generate_key("P-256", parameters={"kid": "ec-1", "alg": "ES256"})
PRIVATE_MEMBERS = ("d", "p", "q", "dp", "dq", "qi")


def page_of(app: dict) -> str:
    return f"/dashboard/applications/{app['client_id']}"


async def opened(client, app: dict) -> str:
    response = await client.get(page_of(app))
    assert response.status == 200, await response.text()
    return await response.text()


async def post(client, app: dict, action: str, fields: dict[str, str]):
    """A form on the application page, as a browser posts it: with the session's CSRF
    token and, for the settings form, the version the page showed."""
    text = await opened(client, app)
    data = {"csrf_token": hidden(text, "csrf_token"), "version": hidden(text, "version")}
    return await client.post(page_of(app) + action, data=data | fields, allow_redirects=False)


async def notice_after(client, response) -> str:
    """The page the change redirected to, with its notice."""
    assert response.status == 303, await response.text()
    page = await client.get(response.headers["Location"])
    text = await page.text()
    match = re.search(r'<p role="status"><strong>(.*?)</strong></p>', text, re.S)
    assert match, text
    return html.unescape(match.group(1))


async def stored(client, company, app: dict) -> dict:
    response = await client.get(f"/admin/applications/{app['client_id']}", headers=company.auth)
    return await response.json()


async def events(db, *types: str) -> list[dict]:
    rows = await db.pool.fetch(
        "SELECT type, payload, metadata FROM events WHERE type = ANY($1) ORDER BY position",
        list(types),
    )
    return [{"type": r["type"], **json.loads(r["payload"]), "meta": json.loads(r["metadata"])}
            for r in rows]  # fmt: skip


async def count(db) -> int:
    return await db.pool.fetchval("SELECT count(*) FROM events")


@pytest.fixture
async def signed_in(client, company):
    await sign_in(client, company.admin_email, company.admin_password)


# --- keys ------------------------------------------------------------------------------


async def test_a_pasted_key_signs_assertions_until_it_is_removed(client, company, db, signed_in):
    app = await new_app(client, company, token_endpoint_auth_method="private_key_jwt")
    text = await opened(client, app)
    assert "No keys yet" in text
    assert 'name="jwks"' in text

    added = await post(client, app, "/keys", {"jwks": json.dumps(jwks(RSA, EC))})
    said = await notice_after(client, added)
    assert "“team/rsa-1”, “ec-1” added" in said
    text = await opened(client, app)
    keys = text.split('id="keys-heading"')[1].split("</table>")[0]
    assert "<code>team/rsa-1</code>" in keys and "RSA 2048 bits" in keys
    assert f"<code>{RSA.thumbprint()}</code>" in keys
    assert "EC P-256" in keys and "ES256" in keys
    assert keys.count("<time datetime=") == 2  # when each was added
    assert (await token_request(client, assertion(client, app, key=RSA, alg="RS256"))).status == 200
    assert (await token_request(client, assertion(client, app, key=EC))).status == 200

    # Remove: a confirmation page first, the kid (with its "/") in the query
    link = re.search(r'href="([^"]*/keys/remove\?kid=[^"]*)"[^>]*Remove the key team/rsa-1', text)
    assert link, keys
    confirm = await client.get(link.group(1).replace("&amp;", "&"))
    assert confirm.status == 200
    confirm_text = await confirm.text()
    assert "Remove the key team/rsa-1?" in confirm_text
    assert (await token_request(client, assertion(client, app, key=RSA, alg="RS256"))).status == 200
    removed = await client.post(
        page_of(app) + "/keys/remove",
        data={"csrf_token": hidden(confirm_text, "csrf_token"), "kid": hidden(confirm_text, "kid")},
        allow_redirects=False,
    )
    assert "Key “team/rsa-1” removed" in await notice_after(client, removed)
    refused = await token_request(client, assertion(client, app, key=RSA, alg="RS256"))
    assert refused.status == 400
    assert (await refused.json())["error"] == "invalid_client"
    assert (await token_request(client, assertion(client, app, key=EC))).status == 200
    assert "team/rsa-1" not in await opened(client, app)

    recorded = await events(db, "ClientKeyAdded", "ClientKeyRemoved")
    assert [(e["type"], e["kid"]) for e in recorded] == [
        ("ClientKeyAdded", "team/rsa-1"), ("ClientKeyAdded", "ec-1"),
        ("ClientKeyRemoved", "team/rsa-1"),
    ]  # fmt: skip
    assert all(e["meta"]["actor"].startswith("user:") for e in recorded)
    assert all(set(e["jwk"]) & set(PRIVATE_MEMBERS) == set() for e in recorded if "jwk" in e)


async def test_one_jwk_pasted_alone_is_added(client, company, db, signed_in):
    app = await new_app(client, company, token_endpoint_auth_method="private_key_jwt")
    added = await post(client, app, "/keys", {"jwks": json.dumps(EC.as_dict(private=False))})
    assert "“ec-1” added" in await notice_after(client, added)
    assert (await token_request(client, assertion(client, app, key=EC))).status == 200


async def test_removing_an_unknown_key_or_another_companys_is_404(
    client, company, other_company, db, signed_in
):
    app = await new_app(client, company, token_endpoint_auth_method="private_key_jwt",
                        jwks=jwks(EC))  # fmt: skip
    theirs = await new_app(client, other_company, token_endpoint_auth_method="private_key_jwt",
                           jwks=jwks(EC))  # fmt: skip
    assert (await client.get(page_of(app) + "/keys/remove?kid=nope")).status == 404
    assert (await client.get(page_of(theirs) + "/keys/remove?kid=ec-1")).status == 404
    token = hidden(await opened(client, app), "csrf_token")
    before = await count(db)
    for target, kid in ((app, "nope"), (theirs, "ec-1"), (app, "")):
        response = await client.post(
            page_of(target) + "/keys/remove", data={"csrf_token": token, "kid": kid},
            allow_redirects=False,
        )  # fmt: skip
        assert response.status == 404
        assert response.content_type == "text/html"
    added = await client.post(
        page_of(theirs) + "/keys",
        data={"csrf_token": token, "jwks": json.dumps(jwks(RSA))}, allow_redirects=False,
    )  # fmt: skip
    assert added.status == 404
    assert await count(db) == before


PEM = "-----BEGIN PRIVATE KEY-----\nMIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQg\n-----END PRIVATE KEY-----"


@pytest.mark.parametrize(
    "pasted",
    [
        pytest.param(lambda: json.dumps({"keys": [RSA.as_dict(private=True)]}), id="rsa-set"),
        pytest.param(lambda: json.dumps(EC.as_dict(private=True)), id="ec-alone"),
        pytest.param(
            lambda: json.dumps({"keys": [EC.as_dict(private=False), RSA.as_dict(private=True)]}),
            id="second-of-two",
        ),
        pytest.param(lambda: PEM, id="pem"),
    ],
)
async def test_a_pasted_private_key_is_refused_never_shown_logged_or_recorded(
    client, company, db, signed_in, pasted
):
    app = await new_app(client, company, token_endpoint_auth_method="private_key_jwt")
    before = await count(db)
    text = pasted()
    with structlog.testing.capture_logs() as lines:
        response = await post(client, app, "/keys", {"jwks": text})
        page = await response.text()
    assert response.status == 400
    assert response.content_type == "text/html"
    assert "Nothing was saved." in page
    assert "private key" in page
    assert '<textarea id="jwks" name="jwks" class="jwk"' in page
    assert re.search(r'name="jwks"[^>]*></textarea>', page)  # empty again
    secrets = [RSA.as_dict(private=True)[m] for m in PRIVATE_MEMBERS]
    secrets += [EC.as_dict(private=True)["d"], "MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQg"]
    logged = json.dumps(lines, default=str)
    for secret in secrets:
        assert secret not in page
        assert secret not in logged
    assert await count(db) == before
    dumped = str([tuple(r) for r in await db.pool.fetch("SELECT * FROM events")])
    assert all(secret not in dumped for secret in secrets)


@pytest.mark.parametrize(
    ("pasted", "said"),
    [
        ('{"keys": [', "not valid JSON"),
        ("not json at all", "not valid JSON"),
        ("[" * 2000 + "]" * 2000, "nested too deeply"),
        ("", "paste a public key"),
        ('{"keys": "nope"}', "must be a JWK Set"),
        ('{"kty": "oct", "k": "c2VjcmV0"}', "private key material"),
        ('{"kty": "EC", "crv": "P-256", "x": 1}', "needs crv, x, y"),
        ("[]", "must be a JWK Set"),
    ],
)
async def test_a_malformed_paste_is_a_400_with_the_reason(
    client, company, db, signed_in, pasted, said
):
    app = await new_app(client, company, token_endpoint_auth_method="private_key_jwt")
    before = await count(db)
    response = await post(client, app, "/keys", {"jwks": pasted})
    assert response.status == 400
    assert said in await response.text()
    assert await count(db) == before


async def test_bytes_that_are_not_utf8_are_a_400(client, company, db, signed_in):
    app = await new_app(client, company, token_endpoint_auth_method="private_key_jwt")
    token = hidden(await opened(client, app), "csrf_token")
    before = await count(db)
    response = await client.post(
        page_of(app) + "/keys", data=f"csrf_token={token}&jwks=%7B%ff%fe%ed%a0%80".encode(),
        headers={"Content-Type": "application/x-www-form-urlencoded"}, allow_redirects=False,
    )  # fmt: skip
    assert response.status == 400
    assert await count(db) == before


async def test_a_kid_already_registered_is_a_400(client, company, db, signed_in):
    app = await new_app(client, company, token_endpoint_auth_method="private_key_jwt",
                        jwks=jwks(EC))  # fmt: skip
    before = await count(db)
    again = await post(client, app, "/keys", {"jwks": json.dumps(jwks(EC))})
    assert again.status == 400
    assert "a key with kid &#39;ec-1&#39; is already registered" in await again.text()
    twice = await post(client, app, "/keys", {"jwks": json.dumps(jwks(RSA, RSA))})
    assert twice.status == 400
    assert "already registered" in await twice.text()
    assert await count(db) == before


# --- the method, DPoP, the token limit -------------------------------------------------


def radios(text: str) -> list[str]:
    return re.findall(r'name="token_endpoint_auth_method" value="([^"]+)"', text)


async def test_the_method_offered_and_changed_as_the_api_allows(client, company, db, signed_in):
    sync = await new_app(client, company)
    web = await new_app(client, company, grant_type="authorization_code", ip_allowlist=[])
    assert radios(await opened(client, sync)) == [
        "client_secret_basic", "client_secret_post", "private_key_jwt",
    ]  # fmt: skip
    assert radios(await opened(client, web)) == [
        "client_secret_basic", "client_secret_post", "private_key_jwt", "none",
    ]  # fmt: skip
    assert 'value="client_secret_basic" checked' in await opened(client, sync)
    assert 'name="cc_token_limit"' not in await opened(client, web)

    changed = await post(client, sync, "/client-auth", {"token_endpoint_auth_method":
                                                         "client_secret_post"})  # fmt: skip
    assert (await notice_after(client, changed)).startswith("Client authentication saved.")
    assert (await stored(client, company, sync))["token_endpoint_auth_method"] == (
        "client_secret_post"
    )
    # the secret in the body (HTTP Basic stays accepted: either is, for a secret method)
    in_body = await client.post(
        "/oauth/token", data={"grant_type": "client_credentials", "client_id": sync["client_id"],
                              "client_secret": sync["client_secret"]},
    )  # fmt: skip
    assert in_body.status == 200

    # what the API refuses, the page refuses with the API's words
    api = await client.patch(
        f"/admin/applications/{sync['client_id']}", json={"token_endpoint_auth_method": "none"},
        headers=company.auth,
    )  # fmt: skip
    api_message = (await api.json())["error_description"]
    before = await count(db)
    for method in ("none", "bogus"):
        refused = await post(client, sync, "/client-auth", {"token_endpoint_auth_method": method})
        assert refused.status == 400
        text = await refused.text()
        assert "Nothing was saved." in text
        if method == "none":
            assert api_message in text
        else:
            assert "token_endpoint_auth_method: must be one of" in text
    assert await count(db) == before

    public = await post(client, web, "/client-auth", {"token_endpoint_auth_method": "none"})
    await notice_after(client, public)
    web_page = await opened(client, web)
    assert "A public client has no secret" in web_page
    assert "Rotate the secret" not in web_page
    back = await post(client, web, "/client-auth", {"token_endpoint_auth_method":
                                                     "client_secret_basic"})  # fmt: skip
    assert "rotate the secret to get one" in await notice_after(client, back)
    recorded = await events(db, "TokenEndpointAuthMethodChanged")
    assert [(e["before"], e["after"]) for e in recorded] == [
        ("client_secret_basic", "client_secret_post"),
        ("client_secret_basic", "none"),
        ("none", "client_secret_basic"),
    ]
    assert all(e["meta"]["actor"].startswith("user:") for e in recorded)


async def test_switching_to_private_key_jwt_then_adding_a_key(client, company, db, signed_in):
    app = await new_app(client, company)
    switched = await post(client, app, "/client-auth", {"token_endpoint_auth_method":
                                                         "private_key_jwt"})  # fmt: skip
    assert "Add a public key" in await notice_after(client, switched)
    assert (await cc_request(client, app)).status == 401  # the secret is refused now
    added = await post(client, app, "/keys", {"jwks": json.dumps(jwks(EC))})
    await notice_after(client, added)
    assert (await token_request(client, assertion(client, app, key=EC))).status == 200


async def test_requiring_dpop_refuses_a_plain_token_request(client, company, db, signed_in):
    app = await new_app(client, company)
    assert (await cc_request(client, app)).status == 200
    method = {"token_endpoint_auth_method": "client_secret_basic"}
    required = await post(client, app, "/client-auth", method | {"dpop_bound_access_tokens":
                                                                 "true"})  # fmt: skip
    await notice_after(client, required)
    assert 'name="dpop_bound_access_tokens" value="true" checked' in await opened(client, app)
    plain = await cc_request(client, app)
    assert plain.status == 400
    assert (await plain.json())["error"] == "invalid_dpop_proof"
    assert (await cc_request(client, app, proof(client))).status == 200

    unchecked = await post(client, app, "/client-auth", method)  # an unchecked box is not sent
    await notice_after(client, unchecked)
    assert (await cc_request(client, app)).status == 200
    recorded = await events(db, "DpopBoundAccessTokensChanged")
    assert [(e["before"], e["after"]) for e in recorded] == [(False, True), (True, False)]


async def test_the_live_token_limit_is_set_and_cleared(client, company, db, signed_in):
    app = await new_app(client, company)
    method = {"token_endpoint_auth_method": "client_secret_basic"}
    text = await opened(client, app)
    assert re.search(r'name="cc_token_limit" type="number"[^>]*value=""', text)
    assert "the server&#39;s default (1000)" in text or "server's default (1000)" in text

    limited = await post(client, app, "/client-auth", method | {"cc_token_limit": "2"})
    await notice_after(client, limited)
    assert (await stored(client, company, app))["cc_token_limit"] == 2
    assert 'value="2"' in await opened(client, app)
    await client.app[CONTEXT].refresh()
    first = (await cc_token(client, app))["access_token"]
    for _ in range(2):
        await client.app[CONTEXT].refresh()  # the token limit counts what the model holds
        await cc_token(client, app)
    ended = await client.get("/api/v1/whoami", headers={"Authorization": f"Bearer {first}"})
    assert ended.status == 401  # the third beyond the limit of 2 ended the oldest

    before = await count(db)
    for wrong in ("-1", "abc", "1e3", "²", "20000000", "9" * 40):
        refused = await post(client, app, "/client-auth", method | {"cc_token_limit": wrong})
        assert refused.status == 400, wrong
        assert "cc_token_limit: must" in await refused.text()
    assert await count(db) == before

    cleared = await post(client, app, "/client-auth", method | {"cc_token_limit": ""})
    await notice_after(client, cleared)
    assert (await stored(client, company, app))["cc_token_limit"] is None
    same = await post(client, app, "/client-auth", method)  # the field absent: left alone
    assert await notice_after(client, same) == "Nothing to change."
    recorded = await events(db, "CcTokenLimitChanged")
    assert [(e["before"], e["after"]) for e in recorded] == [(None, 2), (2, None)]

    web = await new_app(client, company, grant_type="authorization_code", ip_allowlist=[])
    forged = await post(client, web, "/client-auth", method | {"cc_token_limit": "5"})
    assert forged.status == 400
    assert "applies to client_credentials applications only" in await forged.text()


async def test_a_change_made_meanwhile_is_shown_not_overwritten(client, company, db, signed_in):
    app = await new_app(client, company)
    text = await opened(client, app)
    meanwhile = await client.patch(
        f"/admin/applications/{app['client_id']}", json={"cc_token_limit": 7},
        headers=company.auth,
    )  # fmt: skip
    assert meanwhile.status == 200
    before = await count(db)
    stale = await client.post(
        page_of(app) + "/client-auth",
        data={"csrf_token": hidden(text, "csrf_token"), "version": hidden(text, "version"),
              "token_endpoint_auth_method": "client_secret_basic", "cc_token_limit": ""},
        allow_redirects=False,
    )  # fmt: skip
    assert stale.status == 412
    page = await stale.text()
    assert "Someone changed this application meanwhile" in page
    assert 'value="7"' in page
    assert await count(db) == before
    assert (await stored(client, company, app))["cc_token_limit"] == 7


@pytest.mark.parametrize("version", ["1" * 12, "x", "-1", "\u00b3", "\u0661"])
async def test_a_version_the_page_never_wrote_matches_none(client, company, db, signed_in, version):
    """The form's version is the check against a change made meanwhile: one that no page
    could have written fails it rather than skipping it."""
    app = await new_app(client, company)
    text = await opened(client, app)
    before = await count(db)
    forged = await client.post(
        page_of(app) + "/client-auth",
        data={"csrf_token": hidden(text, "csrf_token"), "version": version,
              "token_endpoint_auth_method": "client_secret_basic", "cc_token_limit": "7"},
        allow_redirects=False,
    )  # fmt: skip
    assert forged.status == 412
    assert await count(db) == before


async def test_the_kid_in_the_remove_link_is_query_encoded(client, company, db, signed_in):
    odd = ECKey.generate_key("P-256", parameters={"kid": "a&b=c d/é"})
    app = await new_app(client, company, token_endpoint_auth_method="private_key_jwt",
                        jwks=jwks(odd))  # fmt: skip
    text = await opened(client, app)
    assert f'keys/remove?kid={quote("a&b=c d/é", safe="/")}"' in text
    confirm = await client.get(page_of(app) + "/keys/remove?kid=" + quote("a&b=c d/é"))
    assert confirm.status == 200
    assert hidden(await confirm.text(), "kid") == "a&b=c d/é"
