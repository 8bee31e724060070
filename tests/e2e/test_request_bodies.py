"""Request bodies that cannot be read or decoded (bad compression, unknown part encodings,
repeated or oversized JSON parameters): a 4xx in the endpoint's error format, never a 500,
and nothing written."""

from __future__ import annotations

import asyncio
import base64
import gzip
import json
import logging
import zlib

import pytest

from service.app import CONTEXT
from service.commands.directory import register_resource_server
from service.eventlog import Metadata
from tests.e2e.oauth_helpers import basic, cc_token, new_app
from tests.e2e.test_dashboard import hidden
from tests.e2e.test_dashboard import sign_in as dashboard_sign_in
from tests.e2e.test_gateway import bearer

FORM = "application/x-www-form-urlencoded"
JSON = "application/json"
CC_BODIES = {FORM: b"grant_type=client_credentials", JSON: b'{"grant_type":"client_credentials"}'}
COMPRESS = {"gzip": gzip.compress, "deflate": zlib.compress}


async def _writes(db) -> tuple[int, int]:
    """Everything a request could have changed: the log, and the sign-in sessions."""
    events = await db.pool.fetchval("SELECT count(*) FROM events")
    sessions = await db.pool.fetchval("SELECT count(*) FROM web_sessions")
    return events, sessions


async def _issued(db) -> int:
    return await db.pool.fetchval("SELECT count(*) FROM events WHERE type = 'AccessTokenIssued'")


async def _assert_oauth_invalid_request(response, mentions: str = "") -> None:
    """RFC 6749 §5.2: a JSON error body, never cached."""
    assert response.status == 400, await response.text()
    body = await response.json()
    assert body["error"] == "invalid_request"
    assert mentions in body["error_description"]
    assert response.headers["Cache-Control"] == "no-store"
    assert response.headers["Pragma"] == "no-cache"


# --- Content-Encoding of the whole body ------------------------------------------------


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
@pytest.mark.parametrize("ctype", [FORM, JSON])
async def test_a_compressed_token_request_is_read(client, company, db, encoding, ctype):
    app = await new_app(client, company)
    response = await client.post(
        "/oauth/token",
        data=COMPRESS[encoding](CC_BODIES[ctype]),
        headers=basic(app["client_id"], app["client_secret"])
        | {"Content-Type": ctype, "Content-Encoding": encoding},
    )
    assert response.status == 200, await response.text()
    assert await _issued(db) == 1


@pytest.mark.parametrize(
    ("path", "ctype", "encoding"),
    [
        ("/oauth/token", FORM, "gzip"),
        ("/oauth/token", JSON, "gzip"),
        ("/oauth/token", FORM, "deflate"),
        ("/oauth/token", JSON, "deflate"),
        ("/oauth/revoke", FORM, "gzip"),
        ("/oauth/introspect", JSON, "gzip"),
    ],
)
async def test_a_body_that_does_not_decompress_is_invalid_request_at_oauth_endpoints(
    client, company, db, path, ctype, encoding, caplog
):
    app = await new_app(client, company)
    before = await _writes(db)
    response = await client.post(
        path,
        data=b"garbage!!!",
        headers=basic(app["client_id"], app["client_secret"])
        | {"Content-Type": ctype, "Content-Encoding": encoding},
    )
    await _assert_oauth_invalid_request(response, f"Can not decode content-encoding: {encoding}")
    assert await _writes(db) == before
    # the client's doing: no error line with a traceback (aiohttp's "Unhandled exception",
    # logged as it drained the body the handler left)
    await asyncio.sleep(0.05)
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, [r.getMessage() for r in errors]


@pytest.mark.parametrize(
    ("path", "ctype"),
    [("/oauth/token", FORM), ("/oauth/token", JSON), ("/admin/keys", JSON), ("/session", JSON)],
)
@pytest.mark.parametrize("encoding", ["compress", "gzip, gzip", "x-custom", "gézip"])
async def test_a_body_in_a_coding_not_decoded_here_is_refused(
    client, company, db, path, ctype, encoding
):
    """RFC 9110 §15.5.16: a content coding the server does not decode is a 415 naming those
    it does (Accept-Encoding, §12.5.3). It was read as it came, as if it were none: a
    token was issued for `Content-Encoding: x-custom`."""
    app = await new_app(client, company)
    before = await _writes(db)
    plain = CC_BODIES[ctype] if path == "/oauth/token" else b'{"label": "ci"}'
    if path == "/session":
        plain = json.dumps({"email": company.admin_email, "password": company.admin_password})
    auth = basic(app["client_id"], app["client_secret"]) if path == "/oauth/token" else {}
    if path == "/admin/keys":
        auth = company.auth
    refused = await client.post(
        path,
        data=plain,
        headers=auth
        | {"Content-Type": ctype, "Content-Encoding": encoding.encode().decode("latin-1")},
    )
    if path == "/oauth/token":  # RFC 6749 §5.2's shape, as every error there
        await _assert_oauth_invalid_request(refused, "Content-Encoding must be one of")
    else:
        assert refused.status == 415, await refused.text()
        assert refused.headers["Accept-Encoding"] == "deflate, gzip"
    assert await _writes(db) == before


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
async def test_an_admin_body_that_does_not_decompress_is_invalid_request(
    client, company, db, encoding
):
    headers = company.auth | {"Content-Type": JSON, "Content-Encoding": encoding}
    before = await _writes(db)
    refused = await client.post("/admin/keys", data=b"garbage!!!", headers=headers)
    assert refused.status == 400, await refused.text()
    body = await refused.json()
    assert body["error"] == "invalid_request"
    assert (
        body["error_description"] == f"unreadable body: Can not decode content-encoding: {encoding}"
    )
    assert await _writes(db) == before
    # the same endpoint reads a body that does decompress
    made = await client.post(
        "/admin/keys", data=COMPRESS[encoding](b'{"label":"ci"}'), headers=headers
    )
    assert made.status == 201, await made.text()
    assert (await made.json())["label"] == "ci"


# --- encodings of one multipart part ---------------------------------------------------


def _multipart(part_headers: str, value: bytes) -> tuple[bytes, dict[str, str]]:
    body = (
        b"--b\r\n"
        b'Content-Disposition: form-data; name="grant_type"\r\n'
        + part_headers.encode()
        + b"\r\n"
        + value
        + b"\r\n--b--\r\n"
    )
    return body, {"Content-Type": "multipart/form-data; boundary=b"}


# (a part's Content-Encoding is ignored in form-data, RFC 7578 §4.8; its transfer encoding
# is not)
BAD_PARTS = [
    ("Content-Transfer-Encoding: x-bogus\r\n", b"client_credentials"),
    ("Content-Transfer-Encoding: base64\r\n", b"abc"),  # not base64: no padding
]


@pytest.mark.parametrize(("part_headers", "value"), BAD_PARTS)
async def test_a_part_that_cannot_be_decoded_is_invalid_request_at_the_token_endpoint(
    client, company, db, part_headers, value
):
    app = await new_app(client, company)
    body, headers = _multipart(part_headers, value)
    before = await _writes(db)
    response = await client.post(
        "/oauth/token",
        data=body,
        headers=basic(app["client_id"], app["client_secret"]) | headers,
    )
    await _assert_oauth_invalid_request(response, "unreadable form body")
    assert await _writes(db) == before


async def test_a_part_in_a_known_transfer_encoding_is_read(client, company, db):
    app = await new_app(client, company)
    body, headers = _multipart(
        "Content-Transfer-Encoding: base64\r\n", base64.b64encode(b"client_credentials")
    )
    response = await client.post(
        "/oauth/token",
        data=body,
        headers=basic(app["client_id"], app["client_secret"]) | headers,
    )
    assert response.status == 200, await response.text()
    assert await _issued(db) == 1


@pytest.mark.parametrize(
    "path", ["/oauth/login", "/oauth/authorize", "/dashboard/login", "/dashboard/logout"]
)
async def test_a_part_in_an_unknown_transfer_encoding_is_400_at_the_browser_forms(
    client, company, db, path
):
    body, headers = _multipart("Content-Transfer-Encoding: x-bogus\r\n", b"x")
    before = await _writes(db)
    response = await client.post(path, data=body, headers=headers, allow_redirects=False)
    assert response.status == 400, await response.text()
    answer = await response.json()
    assert answer["error"] == "invalid_request"
    assert "unknown content transfer encoding" in answer["error_description"]
    assert await _writes(db) == before


# --- JSON parameters, held to the form's rules -----------------------------------------


@pytest.mark.parametrize(
    ("ctype", "body", "repeated"),
    [
        (JSON, '{"grant_type":"password","grant_type":"client_credentials"}', "grant_type"),
        (JSON, '{"grant_type":"client_credentials","scope":"invoices:read","scope":""}', "scope"),
        (FORM, "grant_type=password&grant_type=client_credentials", "grant_type"),
        (FORM, "grant_type=client_credentials&scope=invoices%3Aread&scope=", "scope"),
    ],
)
async def test_a_parameter_given_twice_is_refused(client, company, db, ctype, body, repeated):
    """RFC 6749 §3.1: request parameters MUST NOT be included more than once, whatever the
    repeat's value (an empty one too): JSON must not quietly keep the last one, nor a form."""
    app = await new_app(client, company)
    response = await client.post(
        "/oauth/token",
        data=body.encode(),
        headers=basic(app["client_id"], app["client_secret"]) | {"Content-Type": ctype},
    )
    await _assert_oauth_invalid_request(response, f"{repeated} is given more than once")
    assert await _issued(db) == 0


async def test_a_json_parameter_given_twice_is_refused_at_revocation(client, company, db):
    app = await new_app(client, company)
    before = await _writes(db)
    response = await client.post(
        "/oauth/revoke",
        data=b'{"token":"a","token":"b"}',
        headers=basic(app["client_id"], app["client_secret"]) | {"Content-Type": JSON},
    )
    await _assert_oauth_invalid_request(response, "token is given more than once")
    assert await _writes(db) == before


def _oversized(ctype: str) -> bytes:
    padding = "x" * (17 * 1024)
    if ctype == JSON:
        return json.dumps({"grant_type": "client_credentials", "scope": padding}).encode()
    return f"grant_type=client_credentials&scope={padding}".encode()


async def _chunked(body: bytes):
    # an async generator makes the client send Transfer-Encoding: chunked, with no
    # Content-Length for the server to check up front
    for start in range(0, len(body), 4096):
        yield body[start : start + 4096]


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
@pytest.mark.parametrize("ctype", [FORM, JSON])
async def test_an_oversized_body_is_invalid_request_in_either_format(
    client, company, db, ctype, chunked
):
    app = await new_app(client, company)
    body = _oversized(ctype)
    response = await client.post(
        "/oauth/token",
        data=_chunked(body) if chunked else body,
        headers=basic(app["client_id"], app["client_secret"]) | {"Content-Type": ctype},
    )
    await _assert_oauth_invalid_request(response, "at most 16384 bytes")
    assert await _issued(db) == 0


# --- urlencoded forms, read without aiohttp's post() -------------------------------------


async def test_a_form_in_a_charset_it_names_is_read(client, company, db):
    app = await new_app(client, company)
    response = await client.post(
        "/oauth/token",
        data="grant_type=client_credentials&scope=invoices%3Aread".encode("latin-1"),
        headers=basic(app["client_id"], app["client_secret"])
        | {"Content-Type": f"{FORM}; charset=latin-1"},
    )
    assert response.status == 200, await response.text()
    assert (await response.json())["scope"] == "invoices:read"


@pytest.mark.parametrize(
    ("ctype", "body"),
    [
        (f"{FORM}; charset=no-such-charset", b"grant_type=client_credentials"),
        (FORM, b"grant_type=client_credentials&note=\xff\xfe"),  # not UTF-8
    ],
    ids=["unknown-charset", "bytes-outside-the-charset"],
)
async def test_a_form_that_does_not_decode_is_invalid_request(client, company, db, ctype, body):
    app = await new_app(client, company)
    before = await _writes(db)
    response = await client.post(
        "/oauth/token",
        data=body,
        headers=basic(app["client_id"], app["client_secret"]) | {"Content-Type": ctype},
    )
    await _assert_oauth_invalid_request(response, "unreadable form body")
    assert await _writes(db) == before


async def test_a_form_of_more_than_a_thousand_fields_is_refused(client, company, db):
    app = await new_app(client, company)
    body = "grant_type=client_credentials&" + "&".join(f"f{i}=1" for i in range(1000))
    response = await client.post(
        "/oauth/token",
        data=body.encode(),
        headers=basic(app["client_id"], app["client_secret"]) | {"Content-Type": FORM},
    )
    await _assert_oauth_invalid_request(response, "at most 1000 fields")
    assert await _issued(db) == 0


# --- text a named charset decodes to, and Unicode does not hold ------------------------

UTF7_SURROGATE = b"+2AA-"  # UTF-7 for U+D800, half of a pair, alone


BROWSER_FORMS = ["/oauth/login", "/oauth/authorize", "/oauth/switch-user", "/dashboard/login",
                 "/dashboard/logout"]  # fmt: skip


@pytest.mark.parametrize("path", ["/oauth/token", *BROWSER_FORMS])
@pytest.mark.parametrize("shape", ["urlencoded", "multipart"])
async def test_a_form_that_decodes_to_a_lone_surrogate_is_invalid_request(
    client, company, db, path, shape
):
    """A charset the client names may decode to a lone surrogate, which every later
    encode() (a password's hash, a CSRF token's comparison, the page showing the value
    back) fails on: refused as the form is read, a 400, not a 500."""
    if shape == "urlencoded":
        body = b"grant_type=client_credentials&csrf_token=" + UTF7_SURROGATE + b"&password=%2B2AA-"
        headers = {"Content-Type": f"{FORM}; charset=utf-7"}
    else:
        body = (
            b'--b\r\nContent-Disposition: form-data; name="csrf_token"\r\n'
            b"Content-Type: text/plain; charset=utf-7\r\n\r\n" + UTF7_SURROGATE + b"\r\n--b--\r\n"
        )
        headers = {"Content-Type": "multipart/form-data; boundary=b; charset=utf-7"}
    before = await _writes(db)
    response = await client.post(path, data=body, headers=headers, allow_redirects=False)
    assert response.status == 400, await response.text()
    answer = await response.json()
    assert answer["error"] == "invalid_request"
    assert "lone surrogate" in answer["error_description"]
    assert await _writes(db) == before


async def test_a_dashboard_form_that_decodes_to_a_lone_surrogate_is_refused(client, company, db):
    """Past the session and CSRF checks too: a new key's label, shown back in the form."""
    await dashboard_sign_in(client, company.admin_email, company.admin_password)
    page = await client.get("/dashboard/keys")
    token = hidden(await page.text(), "csrf_token")
    before = await _writes(db)
    response = await client.post(
        "/dashboard/keys",
        data=b"csrf_token=" + token.encode() + b"&label=x" + UTF7_SURROGATE,
        headers={"Content-Type": f"{FORM}; charset=utf-7"},
        allow_redirects=False,
    )
    assert response.status == 400, await response.text()
    assert await _writes(db) == before


@pytest.mark.parametrize(
    ("path", "method", "body", "repeated"),
    [
        ("/admin/keys", "post", b'{"label": "first", "label": "second"}', "label"),
        ("/admin/applications/{client_id}", "patch",
         b'{"permissions": ["invoices:read"], "permissions": ["invoices:read", "debtors:read"]}',
         "permissions"),
        # at any depth: a JWK inside a key registration
        ("/admin/applications/{client_id}/keys", "post",
         b'{"keys": [{"kty": "EC", "kty": "RSA", "crv": "P-256", "x": "a", "y": "b"}]}', "kty"),
    ],
)  # fmt: skip
async def test_an_admin_body_that_names_a_key_twice_is_refused(
    client, company, db, path, method, body, repeated
):
    """RFC 8259 §4: what a repeated name means is unpredictable; a proxy or a log that
    reads the first would see another request than the one acted on."""
    app = await new_app(client, company)
    before = await _writes(db)
    response = await getattr(client, method)(
        path.format(client_id=app["client_id"]),
        data=body,
        headers=company.auth | {"Content-Type": JSON},
    )
    assert response.status == 400, await response.text()
    assert f"{repeated} is given more than once" in (await response.json())["error_description"]
    assert await _writes(db) == before


async def test_a_policy_check_that_names_the_ip_twice_is_refused(client, company, db):
    """Before, the last `ip` decided: a resource server's WAF or log that read the first
    saw a refused address where an allowed one was checked."""
    app = await new_app(client, company)
    token = (await cc_token(client, app))["access_token"]
    _, key = await register_resource_server(client.app[CONTEXT], "rs", Metadata())
    before = await _writes(db)
    response = await client.post(
        "/policy/check",
        data=json.dumps({"token": token}).encode()[:-1]
        + b', "ip": "192.0.2.9", "ip": "127.0.0.1"}',
        headers=bearer(key) | {"Content-Type": JSON},
    )
    assert response.status == 400, await response.text()
    assert "ip is given more than once" in (await response.json())["error_description"]
    assert await _writes(db) == before


@pytest.mark.parametrize("value", ["0001-01-01T00:00+01:00", "9999-12-31T23:59-14:00"])
async def test_a_history_time_an_offset_takes_off_the_calendar_is_a_problem_not_a_500(
    client, company, value
):
    await dashboard_sign_in(client, company.admin_email, company.admin_password)
    for name in ("since", "until"):
        response = await client.get("/dashboard/history", params={name: value})
        assert response.status == 400, await response.text()
        assert "not a date and time" in await response.text()
