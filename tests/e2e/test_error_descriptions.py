"""Every error_description in RFC 6749 §5.2's characters (%x20-21 / %x23-5B / %x5D-7E):
a client library may refuse others, and in a WWW-Authenticate challenge a '"' ends the
quoted-string early. The texts that held a "§" or quotes, at each place they are sent."""

from __future__ import annotations

import json
import re
import time
import uuid
from urllib.parse import parse_qs, urlsplit

from joserfc import jws
from joserfc.jwk import ECKey

from service.errors import rfc6749_text
from tests.e2e.oauth_helpers import authorize_url, basic, new_app, sign_in
from tests.e2e.test_dpop import bound_cc_token, issuer
from tests.e2e.test_native_apps import public_app

RFC6749_TEXT = re.compile(r"[\x20\x21\x23-\x5b\x5d-\x7e]*")
#: a challenge's auth-params (RFC 9110 §11.2), each value a token or a quoted-string
AUTH_PARAMS = re.compile(r'[A-Za-z]+ ([a-z_]+=("[^"\\]*"|[^",\s]+)(, |$))+')


def test_the_text_rule():
    assert rfc6749_text('RFC 6749 §2.3, typ "dpop+jwt", a\\b, café\n') == (
        "RFC 6749 section 2.3, typ 'dpop+jwt', a/b, caf??"
    )
    assert RFC6749_TEXT.fullmatch(rfc6749_text("".join(map(chr, range(0x2FF)))))


async def test_two_client_authentication_methods(client, company):
    app = await new_app(client, company)
    response = await client.post(
        "/oauth/token",
        data={"grant_type": "client_credentials", "client_secret": app["client_secret"]},
        headers=basic(app["client_id"], app["client_secret"]),
    )
    assert response.status in (400, 401)
    description = (await response.json())["error_description"]
    assert "section 2.3" in description
    assert RFC6749_TEXT.fullmatch(description), description


async def test_a_dpop_challenge_at_the_gateway_parses(client, company):
    app = await new_app(client, company)
    token = await bound_cc_token(client, app)
    key = ECKey.generate_key("P-256")
    body = {"jti": uuid.uuid4().hex, "htm": "GET", "htu": f"{issuer(client)}/api/v1/whoami",
            "iat": int(time.time())}  # fmt: skip
    header = {"typ": "JWT", "alg": "ES256", "jwk": key.as_dict(private=False)}
    wrong_typ = jws.serialize_compact(header, json.dumps(body), key, algorithms=["ES256"])
    response = await client.get(
        "/api/v1/whoami", headers={"Authorization": f"DPoP {token}", "DPoP": wrong_typ}
    )
    assert response.status == 401
    challenge = response.headers["WWW-Authenticate"]
    assert AUTH_PARAMS.fullmatch(challenge), challenge
    assert "'dpop+jwt'" in challenge
    assert RFC6749_TEXT.fullmatch((await response.json())["error_description"])


async def test_an_authorization_error_redirect(client, company):
    app = await public_app(client, company)
    url = authorize_url(app)  # no code_challenge
    await sign_in(client, company.admin_email, company.admin_password, url)
    response = await client.get(url, allow_redirects=False)
    assert response.status == 302
    [description] = parse_qs(urlsplit(response.headers["Location"]).query)["error_description"]
    assert "RFC 8252 section 8.1" in description
    assert RFC6749_TEXT.fullmatch(description), description
