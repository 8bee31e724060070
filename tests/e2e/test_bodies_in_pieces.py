"""Request bodies that arrive in pieces, as they do on real networks (a slow link, TCP
segments, many small chunks): every route that takes a body reads all of it and answers
as it does to the body in one piece; an oversized body in pieces is still refused.

The requests are written by hand to a raw socket with TCP_NODELAY, so each piece leaves
on its own, which no HTTP client library promises."""

from __future__ import annotations

import asyncio
import dataclasses
import http.client
import io
import itertools
import json
import random
import re
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from email.message import Message
from http.cookies import SimpleCookie
from typing import Any
from urllib.parse import urlencode

import pytest
import structlog
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from joserfc.jwk import ECKey

from service.app import CONTEXT
from service.commands.directory import register_resource_server
from service.eventlog import Metadata
from service.web.login import CHOICE_COOKIE, CHOICE_PATH
from tests.conftest import Company, make_company
from tests.e2e.oauth_helpers import authorize_url, basic, cc_token, hidden_fields, new_app, sign_in
from tests.e2e.test_dashboard import sign_in as dashboard_sign_in
from tests.e2e.test_private_key_jwt import assertion, assertion_params, keyed_app

FORM = "application/x-www-form-urlencoded"
JSON = "application/json"
# Values the server makes up afresh for every request: masked before answers are compared.
GENERATED = {
    "access_token", "refresh_token", "client_id", "client_secret", "key_id", "admin_key",
    "user_id", "password", "csrf_token", "created_at", "updated_at",
    "iat", "exp",  # clock seconds: two tokens a moment apart may fall on either side of one
}  # fmt: skip


# --- the one helper: a request in pieces over a raw socket ------------------------------


@dataclass
class Sent:
    method: str
    path: str
    body: bytes
    headers: dict[str, str]
    status: int
    varying: tuple[str, ...] = ()  # values made unique for each send (an email, say)
    # What the request did, seen afterwards (a sign-out leaves no session behind)
    effect: Callable[[], Awaitable[object]] | None = field(default=None, repr=False)


@dataclass
class Answer:
    status: int
    headers: Message
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class _Received:
    """What http.client needs to parse a response that has already been read."""

    def __init__(self, data: bytes) -> None:
        self._data = data

    def makefile(self, *_args: object, **_kwargs: object) -> io.BytesIO:
        return io.BytesIO(self._data)


def _cut(data: bytes, sizes: tuple[int, int], rng: random.Random) -> list[bytes]:
    pieces = []
    while data:
        step = rng.randint(*sizes)
        pieces.append(data[:step])
        data = data[step:]
    return pieces


def _wire_body(body: bytes, chunked: bool, rng: random.Random) -> bytes:
    """The body as it goes on the wire: as it is, or as many chunks of 7 to 64 bytes."""
    if not chunked:
        return body
    chunks = _cut(body, (7, 64), rng)
    return b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks) + b"0\r\n\r\n"


async def send(
    client: TestClient,
    sent: Sent,
    *,
    body: bytes | None = None,
    chunked: bool = False,
    in_pieces: bool = True,
    sizes: tuple[int, int] = (7, 64),
    pause: float = 0.003,
) -> Answer:
    """The request, its body (`sent.body` unless given) framed by Content-Length or as
    many small chunks, then cut in pieces of `sizes` bytes (chunk framing included) with
    `pause` seconds between them; or, with in_pieces=False, the same bytes in one write."""
    body = sent.body if body is None else body
    rng = random.Random(len(body))  # a reproducible cut
    framing = {"Transfer-Encoding": "chunked"} if chunked else {"Content-Length": str(len(body))}
    head = [f"{sent.method} {sent.path} HTTP/1.1", f"Host: {client.host}:{client.port}"]
    head += [f"{k}: {v}" for k, v in (sent.headers | framing | {"Connection": "close"}).items()]
    reader, writer = await asyncio.open_connection(client.host, client.port)
    writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode())
        await writer.drain()
        wire = _wire_body(body, chunked, rng)
        for piece in _cut(wire, sizes, rng) if in_pieces else [wire]:
            await asyncio.sleep(pause)
            writer.write(piece)
            await writer.drain()
        raw = await reader.read()  # Connection: close, so the answer ends at EOF
    finally:
        writer.close()
    response = http.client.HTTPResponse(_Received(raw))  # type: ignore[arg-type]
    response.begin()
    return Answer(response.status, response.headers, response.read())


# --- what each route is sent, and what of its answer must not change -------------------


Route = Callable[[TestClient, Company], Awaitable[Sent]]


def _json(value: object) -> bytes:
    return json.dumps(value).encode()


def _multipart(fields: dict[str, str]) -> tuple[bytes, str]:
    parts = b"".join(
        b'--b0undary\r\nContent-Disposition: form-data; name="%s"\r\n\r\n%s\r\n'
        % (k.encode(), v.encode())
        for k, v in fields.items()
    )
    return parts + b"--b0undary--\r\n", "multipart/form-data; boundary=b0undary"


def _cookies(client: TestClient, path: str) -> dict[str, str]:
    jar = client.session.cookie_jar.filter_cookies(client.make_url(path))
    return {"Cookie": "; ".join(f"{k}={m.value}" for k, m in jar.items())}


_counter = itertools.count()


async def token_form(client: TestClient, company: Company) -> Sent:
    app = await new_app(client, company)
    headers = basic(app["client_id"], app["client_secret"]) | {"Content-Type": FORM}
    body = b"grant_type=client_credentials&scope=invoices%3Aread+debtors%3Aread"
    return Sent("POST", "/oauth/token", body, headers, 200)


async def token_multipart(client: TestClient, company: Company) -> Sent:
    app = await new_app(client, company)
    body, ctype = _multipart({"grant_type": "client_credentials", "scope": "invoices:read"})
    headers = basic(app["client_id"], app["client_secret"]) | {"Content-Type": ctype}
    return Sent("POST", "/oauth/token", body, headers, 200)


async def token_assertion(client: TestClient, company: Company) -> Sent:
    """private_key_jwt: a signed assertion, a fresh one for each send (each is accepted
    once), in the form body."""
    app = await keyed_app(client, company)
    params = {"grant_type": "client_credentials", "scope": "invoices:read"}
    params |= assertion_params(assertion(client, app))
    return Sent("POST", "/oauth/token", urlencode(params).encode(), {"Content-Type": FORM}, 200)


async def token_json(client: TestClient, company: Company) -> Sent:
    app = await new_app(client, company)
    body = _json(
        {
            "grant_type": "client_credentials",
            "client_id": app["client_id"],
            "client_secret": app["client_secret"],
            "scope": "invoices:read",
        }
    )
    return Sent("POST", "/oauth/token", body, {"Content-Type": JSON}, 200)


def _oauth_endpoint(path: str, ctype: str) -> Route:
    """Revocation or introspection of a live token, the client authenticated by Basic;
    the effect: whether that token is still active afterwards."""

    async def route(client: TestClient, company: Company) -> Sent:
        app = await new_app(client, company)
        auth = basic(app["client_id"], app["client_secret"])
        token = (await cc_token(client, app))["access_token"]
        params = {"token": token, "token_type_hint": "access_token"}
        body = _json(params) if ctype == JSON else urlencode(params).encode()

        async def active() -> bool:
            found = await client.post("/oauth/introspect", data={"token": token}, headers=auth)
            return (await found.json())["active"]

        return Sent("POST", path, body, auth | {"Content-Type": ctype}, 200, effect=active)

    route.__name__ = f"{path.rsplit('/', 1)[1]}_{'json' if ctype == JSON else 'form'}"
    return route


async def oauth_login(client: TestClient, company: Company) -> Sent:
    app = await new_app(client, company, grant_type="authorization_code")
    url = authorize_url(app)
    page = await client.get(url)
    fields = hidden_fields(await page.text(), "/oauth/login")
    fields |= {"email": company.admin_email, "password": company.admin_password}
    headers = _cookies(client, "/oauth/login") | {"Content-Type": FORM}
    return Sent(
        "POST",
        "/oauth/login",
        urlencode(fields).encode(),
        headers,
        303,
        varying=(app["client_id"],),
    )


async def oauth_authorize(client: TestClient, company: Company) -> Sent:
    app = await new_app(client, company, grant_type="authorization_code")
    url = authorize_url(app, state="in-pieces")
    if not client.session.cookie_jar.filter_cookies(client.make_url("/oauth")).get("tg_session"):
        await sign_in(client, company.admin_email, company.admin_password, url)
    page = await client.get(url)
    fields = hidden_fields(await page.text(), "/oauth/authorize") | {"decision": "approve"}
    headers = _cookies(client, "/oauth/authorize") | {"Content-Type": FORM}
    return Sent(
        "POST",
        "/oauth/authorize",
        urlencode(fields).encode(),
        headers,
        302,
        varying=(app["client_id"],),
    )


async def session_sign_in(client: TestClient, company: Company) -> Sent:
    body = _json({"email": company.admin_email, "password": company.admin_password})
    return Sent("POST", "/session", body, {"Content-Type": JSON}, 200)


async def _member(client: TestClient, company: Company, password: str) -> tuple[str, str]:
    """A user of its own for each send, with `password`: (email, user id)."""
    email = f"member-{next(_counter)}@acme.example"
    body = {"email": email, "role": "member", "password": password}
    made = await client.post("/admin/users", json=body, headers=company.auth)
    assert made.status == 201, await made.text()
    return email, (await made.json())["user_id"]


async def change_password(client: TestClient, company: Company) -> Sent:
    """A signed-in user's own password, proven by the current one (signed in past the
    client's cookie jar, with the session's X-CSRF-Token)."""
    old = "the password before, long enough"
    email, user_id = await _member(client, company, old)
    sign_in = Sent("POST", "/session", _json({"email": email, "password": old}),
                   {"Content-Type": JSON}, 200)  # fmt: skip
    signed_in = await send(client, sign_in, in_pieces=False)
    assert signed_in.status == 200, signed_in.body
    session = SimpleCookie(signed_in.headers["Set-Cookie"])["tg_session"].value
    headers = {"Cookie": f"tg_session={session}", "X-CSRF-Token": signed_in.json()["csrf_token"],
               "Content-Type": JSON}  # fmt: skip
    body = _json({"current_password": old, "new_password": "the password after, " + "é" * 12})

    async def old_refused() -> int:
        again = await client.post("/session", json={"email": email, "password": old})
        client.session.cookie_jar.clear()
        return again.status

    return Sent("POST", "/session/password", body, headers, 200, varying=(user_id,),
                effect=old_refused)  # fmt: skip


async def change_role(client: TestClient, company: Company) -> Sent:
    email, user_id = await _member(client, company, "a password nobody types, long enough")
    body = _json({"role": "admin"})
    headers = company.auth | {"Content-Type": JSON}
    return Sent("PATCH", f"/admin/users/{user_id}", body, headers, 200, varying=(email,))


_SHARED_PASSWORD = "one password, two companies"


async def sign_in_choice(client: TestClient, company: Company) -> Sent:
    """The company chosen on /sign-in/choose, after one password opened an account at two
    companies (an address and a second company of their own for each send)."""
    other = await make_company(client, "Globex")
    email = f"shared-{next(_counter)}@shared.example"
    for at in (company, other):
        body = {"email": email, "role": "admin", "password": _SHARED_PASSWORD}
        made = await client.post("/admin/users", json=body, headers=at.auth)
        assert made.status == 201, await made.text()
    form = await (await client.get("/dashboard")).text()
    fields = hidden_fields(form, "/dashboard/login")
    fields |= {"email": email, "password": _SHARED_PASSWORD}
    to_choice = await client.post("/dashboard/login", data=fields, allow_redirects=False)
    assert to_choice.headers.get("Location") == CHOICE_PATH, await to_choice.text()
    key = to_choice.cookies[CHOICE_COOKIE].value
    client.session.cookie_jar.clear()  # the choice travels in the request's own headers
    cookie = {"Cookie": f"{CHOICE_COOKIE}={key}"}
    page = await (await client.get(CHOICE_PATH, headers=cookie)).text()
    fields = hidden_fields(page, CHOICE_PATH) | {"company_id": other.company_id}
    return Sent(
        "POST", CHOICE_PATH, urlencode(fields).encode(), cookie | {"Content-Type": FORM}, 303,
        varying=(other.company_id,),
    )  # fmt: skip


def _application() -> dict[str, Any]:
    return {
        "name": "Pieces app " + "é" * 30,  # multi-byte characters cut between pieces too
        "grant_type": "client_credentials",
        "ip_allowlist": ["127.0.0.1", "10.0.0.0/8", "2001:db8::/32"],
        "permissions": ["invoices:read", "debtors:read"],
        "notification_emails": ["ops@acme.example", "security@acme.example"],
    }


async def create_application(client: TestClient, company: Company) -> Sent:
    headers = company.auth | {"Content-Type": JSON}
    return Sent("POST", "/admin/applications", _json(_application()), headers, 201)


async def patch_application(client: TestClient, company: Company) -> Sent:
    app = await new_app(client, company)
    body = _json({"name": "Renamed in pieces", "ip_allowlist": ["127.0.0.1", "192.0.2.0/24"]})
    headers = company.auth | {"Content-Type": JSON}
    return Sent("PATCH", f"/admin/applications/{app['client_id']}", body, headers, 200)


async def create_user(client: TestClient, company: Company) -> Sent:
    email = f"member-{next(_counter)}@acme.example"
    body = _json({"email": email, "role": "member"})
    return Sent(
        "POST", "/admin/users", body, company.auth | {"Content-Type": JSON}, 201, varying=(email,)
    )


async def create_admin_key(client: TestClient, company: Company) -> Sent:
    body = _json({"label": "deploy key sent over a slow link"})
    return Sent("POST", "/admin/keys", body, company.auth | {"Content-Type": JSON}, 201)


async def policy_check(client: TestClient, company: Company) -> Sent:
    app = await new_app(client, company)
    token = (await cc_token(client, app))["access_token"]
    ctx = client.app[CONTEXT]
    _, key = await register_resource_server(ctx, "billing", Metadata(actor="test"))
    body = _json({"token": token, "ip": "127.0.0.1", "permission": "invoices:read"})
    headers = {"Authorization": f"Bearer {key}", "Content-Type": JSON}
    return Sent("POST", "/policy/check", body, headers, 200)


# A public key with a kid of its own (the server keeps each kid once per application).
_PIECES_KEY = ECKey.generate_key("P-256", parameters={"kid": "pieces-1"})


async def add_client_key(client: TestClient, company: Company) -> Sent:
    app = await new_app(client, company)  # each send its own application: a kid is added once
    body = _json({"keys": [_PIECES_KEY.as_dict(private=False)]})
    headers = company.auth | {"Content-Type": JSON}
    return Sent("POST", f"/admin/applications/{app['client_id']}/keys", body, headers, 201)


async def dashboard_add_key(client: TestClient, company: Company) -> Sent:
    """The application page's key form, as a browser posts it: signed in, its CSRF token
    and the version the page showed, a JWK Set pasted in a textarea."""
    if 'action="/dashboard/login"' in await (await client.get("/dashboard")).text():
        await dashboard_sign_in(client, company.admin_email, company.admin_password)
    app = await new_app(client, company, token_endpoint_auth_method="private_key_jwt")
    page_path = f"/dashboard/applications/{app['client_id']}"
    action = f"{page_path}/keys"
    page = await (await client.get(page_path)).text()
    fields = hidden_fields(page, action)
    fields["jwks"] = json.dumps({"keys": [_PIECES_KEY.as_dict(private=False)]}, indent=2)
    headers = _cookies(client, action) | {"Content-Type": FORM}

    async def listed() -> bool:
        text = await (await client.get(page_path)).text()
        assert "<code>pieces-1</code>" in text, "the pasted key is not listed"
        return True

    return Sent(
        "POST", action, urlencode(fields).encode(), headers, 303,
        varying=(app["client_id"],), effect=listed,
    )  # fmt: skip


async def dashboard_client_auth(client: TestClient, company: Company) -> Sent:
    """The application page's client-authentication form, as a browser posts it: the
    method chosen, DPoP ticked, a live-token limit typed, its CSRF token and version."""
    if 'action="/dashboard/login"' in await (await client.get("/dashboard")).text():
        await dashboard_sign_in(client, company.admin_email, company.admin_password)
    app = await new_app(client, company)
    page_path = f"/dashboard/applications/{app['client_id']}"
    action = f"{page_path}/client-auth"
    fields = hidden_fields(await (await client.get(page_path)).text(), action)
    fields |= {"token_endpoint_auth_method": "private_key_jwt",
               "dpop_bound_access_tokens": "true", "cc_token_limit": "250"}  # fmt: skip
    headers = _cookies(client, action) | {"Content-Type": FORM}

    async def saved() -> list[object]:
        found = await client.get(f"/admin/applications/{app['client_id']}", headers=company.auth)
        body = await found.json()
        return [body["token_endpoint_auth_method"], body["dpop_bound_access_tokens"],
                body["cc_token_limit"]]  # fmt: skip

    return Sent(
        "POST", action, urlencode(fields).encode(), headers, 303,
        varying=(app["client_id"],), effect=saved,
    )  # fmt: skip


async def dashboard_login(client: TestClient, company: Company) -> Sent:
    page = await client.get("/dashboard")
    fields = hidden_fields(await page.text(), "/dashboard/login")
    fields |= {"email": company.admin_email, "password": company.admin_password}
    headers = _cookies(client, "/dashboard/login") | {"Content-Type": FORM}
    return Sent("POST", "/dashboard/login", urlencode(fields).encode(), headers, 303)


async def dashboard_logout(client: TestClient, company: Company) -> Sent:
    # Signed in past the client's cookie jar, so that each sign-out has a session of its own.
    sign_in = await session_sign_in(client, company)
    signed_in = await send(client, sign_in, in_pieces=False)
    assert signed_in.status == 200
    session = SimpleCookie(signed_in.headers["Set-Cookie"])["tg_session"].value
    client.session.cookie_jar.clear()
    page = await client.get("/dashboard", headers={"Cookie": f"tg_session={session}"})
    fields = hidden_fields(await page.text(), "/dashboard/logout")
    # A session made elsewhere is swapped for one whose token the dashboard knows: the
    # form's token is the new session's, and so must the sign-out's cookie be.
    session = page.cookies["tg_session"].value if "tg_session" in page.cookies else session
    cookie = {"Cookie": f"tg_session={session}"}
    client.session.cookie_jar.clear()

    async def still_signed_in() -> bool:
        again = await client.get("/dashboard", headers=cookie)
        client.session.cookie_jar.clear()
        return 'name="password"' not in await again.text()

    return Sent(
        "POST",
        "/dashboard/logout",
        urlencode(fields).encode(),
        cookie | {"Content-Type": FORM},
        303,
        effect=still_signed_in,
    )


async def gateway(client: TestClient, company: Company) -> Sent:
    app = await new_app(client, company, permissions=["invoices:read", "invoices:write"])
    token = (await cc_token(client, app))["access_token"]
    body = _json({"invoice": {"lines": [{"text": f"line {n}", "cents": n} for n in range(40)]}})
    headers = {"Authorization": f"Bearer {token}", "Content-Type": JSON}
    return Sent("POST", "/api/v1/invoices?draft=1", body, headers, 200)


ROUTES: list[Route] = [
    token_form, token_multipart, token_json, token_assertion,
    _oauth_endpoint("/oauth/revoke", FORM), _oauth_endpoint("/oauth/revoke", JSON),
    _oauth_endpoint("/oauth/introspect", FORM), _oauth_endpoint("/oauth/introspect", JSON),
    oauth_login, oauth_authorize, session_sign_in,
    create_application, patch_application, create_user, create_admin_key, add_client_key,
    policy_check, dashboard_login, dashboard_logout, dashboard_add_key, gateway,
    change_password, change_role, sign_in_choice, dashboard_client_auth,
]  # fmt: skip


def _masked(value: Any, varying: tuple[str, ...]) -> Any:
    if isinstance(value, dict):
        return {
            k: "<generated>" if k in GENERATED else _masked(v, varying) for k, v in value.items()
        }
    if isinstance(value, list):
        return [_masked(v, varying) for v in value]
    return "<sent>" if value in varying else value


async def _gist(answer: Answer, sent: Sent) -> tuple[object, ...]:
    """The answer less what is new on every request (tokens, ids, the code)."""
    if answer.headers.get_content_type() == JSON:
        body: object = _masked(answer.json(), sent.varying)
    else:
        body = answer.body
    location = re.sub(r"code=[^&]+", "code=<generated>", answer.headers.get("Location", ""))
    for value in sent.varying:
        location = location.replace(value, "<sent>")
    effect = None if sent.effect is None else await sent.effect()
    return answer.status, answer.headers.get_content_type(), location, body, effect


# --- an upstream API for the gateway, which answers with the body it got -----------------


async def _echo(request: web.Request) -> web.Response:
    body = await request.read()
    return web.Response(
        body=body,
        content_type=request.content_type,
        headers={"X-Upstream-Path": request.path_qs, "X-Upstream-Length": str(len(body))},
    )


@pytest.fixture
async def upstream():
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", _echo)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    yield server
    await server.close()


@pytest.fixture
def settings(settings, upstream):
    return dataclasses.replace(settings, upstream_url=str(upstream.make_url("")).rstrip("/"))


# --- the tests ---------------------------------------------------------------------------


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
@pytest.mark.parametrize("route", ROUTES, ids=lambda r: r.__name__)
async def test_a_body_in_small_pieces_gets_the_same_answer_as_in_one_piece(
    client, company, route, chunked
):
    whole = await route(client, company)
    in_one = await send(client, whole, chunked=chunked, in_pieces=False)
    assert in_one.status == whole.status, in_one.body
    cut = await route(client, company)
    in_pieces = await send(client, cut, chunked=chunked)
    assert in_pieces.status == cut.status, in_pieces.body
    assert await _gist(in_pieces, cut) == await _gist(in_one, whole)


async def test_the_gateway_passes_on_every_piece_of_the_body(client, company):
    sent = await gateway(client, company)
    answer = await send(client, sent, chunked=True)
    assert answer.status == 200, answer.body
    assert answer.body == sent.body
    assert answer.headers["X-Upstream-Length"] == str(len(sent.body))
    assert answer.headers["X-Upstream-Path"] == "/api/v1/invoices?draft=1"


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_a_body_whose_pieces_arrive_slowly_is_accepted(client, company, db, chunked):
    sent = await token_json(client, company)
    answer = await send(client, sent, chunked=chunked, sizes=(20, 40), pause=0.25)
    assert answer.status == 200, answer.body
    assert answer.json()["token_type"] == "Bearer"
    issued = "SELECT count(*) FROM events WHERE type = 'AccessTokenIssued'"
    assert await db.pool.fetchval(issued) == 1


def _padded(sent: Sent, size: int) -> bytes:
    """The body made `size` bytes longer with what changes nothing else: whitespace after
    the JSON, a parameter nobody reads in a form."""
    ctype = sent.headers["Content-Type"]
    if ctype == JSON:
        return sent.body + b" " * size
    if ctype.startswith("multipart/"):
        part = _multipart({"padding": "x" * size})[0].removesuffix(b"--b0undary--\r\n")
        return sent.body.replace(b"--b0undary--", part + b"--b0undary--")
    return sent.body + b"&padding=" + b"x" * size


async def _assert_oauth_too_large(answer: Answer) -> None:
    """RFC 6749 §5.2 shape at the OAuth endpoints, never cached."""
    assert answer.status == 400, answer.body
    body = answer.json()
    assert body["error"] == "invalid_request"
    assert "at most 16384 bytes" in body["error_description"]
    assert answer.headers["Cache-Control"] == "no-store"


@pytest.mark.parametrize(
    "route", [token_form, token_multipart, token_json], ids=lambda r: r.__name__
)
async def test_an_oversized_chunked_body_in_pieces_is_refused_at_the_token_endpoint(
    client, company, db, route
):
    sent = await route(client, company)
    with structlog.testing.capture_logs() as logs:
        answer = await send(
            client,
            sent,
            body=_padded(sent, 16 * 1024),
            chunked=True,
            sizes=(256, 1024),
            pause=0.001,
        )
    await _assert_oauth_too_large(answer)
    issued = "SELECT count(*) FROM events WHERE type = 'AccessTokenIssued'"
    assert await db.pool.fetchval(issued) == 0
    [line] = [e for e in logs if e["event"] == "http.request"]
    assert (line["path"], line["status"]) == ("/oauth/token", 400)
    assert not [e for e in logs if e["log_level"] == "error"]


@pytest.mark.parametrize("route", [token_form, token_multipart], ids=lambda r: r.__name__)
async def test_a_chunked_form_past_the_limit_is_refused_at_the_limit(client, company, route):
    """Not at aiohttp's own, larger limit (1 MiB), and in the OAuth error shape."""
    sent = await route(client, company)
    answer = await send(
        client, sent, body=_padded(sent, 1024 * 1024), chunked=True, sizes=(16384, 65536), pause=0
    )
    await _assert_oauth_too_large(answer)


@pytest.mark.parametrize("route", [create_admin_key, dashboard_login], ids=["json", "form"])
async def test_an_oversized_chunked_body_in_pieces_is_413_elsewhere(client, company, route):
    limit = 64 * 1024
    sent = await route(client, company)
    answer = await send(
        client, sent, body=_padded(sent, limit), chunked=True, sizes=(1024, 4096), pause=0.001
    )
    assert answer.status == 413, answer.body
    assert answer.json() == {
        "error": "request_too_large",
        "error_description": f"the body must be at most {limit} bytes",
    }
