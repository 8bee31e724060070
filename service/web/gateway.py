"""The gateway, /api/{path}: the policy decision on the route rule that covers the request
(none: refused), then the request goes to the upstream API (streamed both ways) with
headers naming the company, client and permissions."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import re
import socket
import struct
from collections.abc import Mapping
from datetime import UTC, datetime
from urllib.parse import urlsplit

import aiohttp
import msgspec
import structlog
from aiohttp import web
from multidict import CIMultiDict

from service.domain import dpop
from service.domain.dpop import NONCE_HEADER
from service.domain.policy import Allowed
from service.domain.routes import WHOAMI, WHOAMI_RULE, resource_path
from service.errors import InvalidRequest, TollgateError
from service.metrics import CLIENT_CLOSED_REQUEST
from service.oauth import credentials as authorization
from service.oauth.dpop import Presented
from service.oauth.errors import BEARER_REALM, InvalidToken, OAuthError
from service.settings import Settings
from service.web.bodies import content_coding, read_body
from service.web.client_ip import peer_trusted
from service.web.keys import (
    CONTEXT,
    REQUEST_ID,
    ROUTES,
    SETTINGS,
    UPSTREAM,
    authorization_header,
    caller_ip,
    metadata,
)
from service.web.middleware import expectation
from service.web.server import ConnectionWatch

log = structlog.get_logger(__name__)
routes = web.RouteTableDef()

#: every cookie Tollgate sets is named tg_...: none of them is the upstream's to see
TOLLGATE_COOKIES = "tg_"
_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close with a reset

IDENTITY_HEADERS = ("X-Tollgate-Company", "X-Tollgate-Client", "X-Tollgate-Permissions")
METHOD_OVERRIDES = ("X-HTTP-Method-Override", "X-HTTP-Method", "X-Method-Override")
REQUEST_ID_HEADER = "X-Request-Id"
#: What the upstream gets from Tollgate alone: the credentials stay here, the identity is
#: Tollgate's, and so is the caller's address (the one the allow list was checked against:
#: an address or a chain the caller sent itself could be forged). Compared with "_" read as
#: "-": many servers (CGI and WSGI among them) take `X_Tollgate_Company` for
#: `X-Tollgate-Company`, and would merge the caller's value with Tollgate's.
NOT_FORWARDED = frozenset(
    h.lower()
    for h in (
        "Authorization", "DPoP", *IDENTITY_HEADERS,
        "X-Forwarded-For", "Forwarded", "X-Real-IP", "X-Client-IP", "True-Client-IP",
        # The permission was decided for the request's method: an upstream framework that
        # honours an override (Express's method-override, Symfony, Laravel, ASP.NET) would
        # run a DELETE that was checked as a POST.
        *METHOD_OVERRIDES,
    )
)  # fmt: skip
#: What a proxy in front says of the request as the client made it (Werkzeug's ProxyFix,
#: Django and Rails build absolute URLs and decide "secure" from these). Believed from a
#: trusted proxy (TRUSTED_PROXIES), spelled with "-"; from anyone else it is the caller's
#: own claim, and an upstream that trusted it would build its links, redirects and reset
#: mails on a host the caller chose. Tollgate then says what it saw itself.
PROXY_CONTEXT = frozenset(
    h.lower()
    for h in (
        "X-Forwarded-Host", "X-Forwarded-Proto", "X-Forwarded-Port", "X-Forwarded-Prefix",
        "X-Forwarded-Server", "X-Forwarded-Scheme", "X-Forwarded-Ssl", "Front-End-Https",
    )
)  # fmt: skip
HOP_BY_HOP = frozenset(
    h.lower()
    for h in (
        "Connection", "Keep-Alive", "Proxy-Authenticate", "Proxy-Authorization", "TE",
        "Trailer", "Transfer-Encoding", "Upgrade", "Host", "Content-Length",
    )
)  # fmt: skip


class BadGateway(TollgateError):
    error = "bad_gateway"
    status = 502


class GatewayTimeout(TollgateError):
    """The upstream said nothing for UPSTREAM_TIMEOUT (RFC 9110 §15.6.5)."""

    error = "gateway_timeout"
    status = 504


class NotCovered(OAuthError):
    """No route rule covers the method and path: refused, whatever the token may do
    (SPEC §3: the gateway fails closed). RFC 6750 §3.1 names no scope that would help."""

    error = "insufficient_scope"
    status = 403

    def __init__(self) -> None:
        challenge = f'Bearer realm="{BEARER_REALM}", error="insufficient_scope"'
        super().__init__(
            "no route rule covers this method and path; the gateway refuses what it does not know",
            headers={"WWW-Authenticate": challenge},
        )


def bearer_token(request: web.Request) -> str:
    found = authorization.parse(authorization_header(request, InvalidRequest))
    if found is None:
        raise InvalidToken("an access token is required", sent=False)
    if not isinstance(found, authorization.Bearer):
        # Another scheme is no attempt at a Bearer token: no error code (RFC 6750 §3.1).
        raise InvalidToken("use Authorization: Bearer <access token>", sent=False)
    return found.value


def access_token(request: web.Request) -> tuple[str, Presented | None]:
    """The access token, and the DPoP proof when it is sent as a DPoP token (RFC 9449 §7.1:
    `Authorization: DPoP <token>` and a `DPoP` header). A Bearer token takes the first
    branch: nothing about DPoP is looked at for it."""
    header = authorization_header(request, InvalidRequest)
    found = authorization.parse(header)
    if isinstance(found, authorization.Bearer):
        return found.value, None
    if isinstance(found, authorization.Unreadable) and found.scheme == "dpop" and header:
        value = header.strip().partition(" ")[2].strip()
        if value:
            return value, _proof(request)
    return bearer_token(request), None  # no token, or one it cannot read: its 401


def _proof(request: web.Request) -> Presented:
    """The request's proof ("" without one: a DPoP token needs one), its method, and its
    public URL: the issuer and the path, as the client called it (RFC 9449 §4.3 item 9)."""
    # Several DPoP headers are their values joined by commas (RFC 9110 §5.3), which no
    # proof holds: refused as the proof, after the allow list (a stolen token sent from a
    # disallowed address is revoked however its proof is malformed).
    proof = ", ".join(request.headers.getall("DPoP", []))
    # The path as sent, still percent-encoded: the URI the client signed.
    public_url = request.app[SETTINGS].issuer.rstrip("/") + request.rel_url.raw_path
    nonces = request.app[CONTEXT].dpop_nonces
    return Presented(proof, request.method, public_url, nonces)


_ENCODED_SEPARATOR = re.compile(r"%(2f|5c)", re.IGNORECASE)


def path_refusal(request: web.Request) -> str:
    """Why the path is refused ("": it is not). The path the permission is decided on is
    the path the upstream gets: one with a `.`/`..` segment, an empty one (`//`) or path
    parameters could mean another route there, so it is refused rather than normalised."""
    return _refusal(request.path, request.rel_url.raw_path)


# The few paths clients call, checked once each: "" when acceptable.
@functools.lru_cache(maxsize=4096)
def _refusal(path: str, raw_path: str) -> str:
    segments = path.split("/")[1:]
    if any(s in (".", "..") for s in segments) or "" in segments[:-1]:
        return "the path has empty, '.' or '..' segments"
    # Decided on the decoded path, forwarded raw: an encoded "/" (or a "\", which some
    # servers read as one) would split segments differently upstream.
    if "\\" in path or _ENCODED_SEPARATOR.search(raw_path):
        return "the path has an encoded '/' or a '\\'"
    # A ";" starts path parameters upstream (Java servlets, some routers strip them before
    # routing): "/invoices;x=1" would be decided as one resource and served as another.
    if ";" in path:
        return "the path has a ';' (path parameters are not accepted)"
    return ""


async def _continue_later(_request: web.BaseRequest) -> None:
    """The gateway's `Expect` handler: no 100 Continue before the token, the allow list,
    the route and the body's length are decided (RFC 9110 §10.1.1: a final status known
    from the header section is sent instead). `_read` sends it once they are."""


# `[\s\S]*`, not `.*`: a decoded path may hold a line break, and a request that fell
# through to the catch-all was answered 404 before its token was looked at.
@routes.route("*", r"/api/{path:[\s\S]*}", expect_handler=_continue_later)
async def gateway(request: web.Request) -> web.StreamResponse:
    app = request.app
    ctx = app[CONTEXT]
    refusal = path_refusal(request)
    try:
        raw, presented = access_token(request)
    except InvalidToken as exc:
        # No token: the challenge offers both schemes the gateway takes (RFC 9449 §7.2)
        offered = f"{exc.headers['WWW-Authenticate']}, DPoP {dpop.ALGS}"
        exc.headers = exc.headers | {"WWW-Authenticate": offered}
        raise
    ip = caller_ip(request)
    rule = None if refusal else app[ROUTES].rule_for(request.method, request.path)
    # The token and the allow list first, covered or not, whatever the path or the proof:
    # a valid token from a disallowed address is revoked wherever it was sent.
    permission = None if rule is None else rule.permission
    point = ctx.policy_point
    allowed = point.allowed_now(raw, ip, permission, "api", bearer=presented is None)
    try:
        if allowed is None:
            meta = metadata(request, "gateway", ip)
            allowed = await point.decide(raw, ip, permission, "api", meta, presented)
        if refusal:
            raise InvalidRequest(refusal)
        if rule is None:
            raise NotCovered()
    except OAuthError as exc:
        if presented is not None:
            dpop.answered_in_dpop(exc, BEARER_REALM)
        raise
    # DPOP_NONCE=required: an allowed DPoP request is told the nonce to use next (RFC 9449 §9)
    nonce = {}
    if presented is not None and presented.nonces is not None:
        nonce = {NONCE_HEADER: await presented.nonces.current()}
    if rule is WHOAMI_RULE:
        response = _whoami(request, allowed)
        if nonce:
            response.headers.update(nonce)
        return response
    upstream = app[UPSTREAM].session
    if upstream is None:
        raise web.HTTPNotFound(reason=f"no upstream API is configured; try GET {WHOAMI}")
    return await _proxy(request, upstream, allowed, ip, nonce)


def _hop_by_hop(headers: Mapping[str, str]) -> frozenset[str]:
    """The fields that end at this hop: the standard ones, and those a message's own
    Connection header names (RFC 9110 §7.6.1: a proxy removes them)."""
    named = headers.get("Connection")
    if not named:
        return HOP_BY_HOP
    return HOP_BY_HOP | {t.strip().lower() for t in named.split(",") if t.strip()}


def _whoami(request: web.Request, allowed: Allowed) -> web.Response:
    """Tollgate's own route, with or without an upstream: who the token is."""
    if request.path != WHOAMI and resource_path(request.path) != WHOAMI:
        raise web.HTTPNotFound(reason=f"{WHOAMI} has no sub-resources")
    if request.method not in ("GET", "HEAD"):
        raise web.HTTPMethodNotAllowed(request.method, ["GET", "HEAD"])
    token = allowed.token
    body = _answer(token.company_id, token.client_id, allowed.permissions, token.expires_at)
    return web.Response(body=body, content_type="application/json")


# A client calls whoami with the same token again and again: its answer is kept.
@functools.lru_cache(maxsize=4096)
def _answer(
    company_id: str, client_id: str, permissions: frozenset[str], expires: int | None
) -> bytes:
    expires_at = None if expires is None else datetime.fromtimestamp(expires, UTC).isoformat()
    return msgspec.json.encode(
        {
            "company_id": company_id,
            "client_id": client_id,
            "permissions": sorted(permissions),
            "expires_at": expires_at,
        }
    )


async def _proxy(
    request: web.Request,
    session: aiohttp.ClientSession,
    allowed: Allowed,
    ip: str,
    nonce: dict[str, str],
) -> web.StreamResponse:
    settings = request.app[SETTINGS]
    assert settings.upstream_url is not None
    target = settings.upstream_url.rstrip("/") + request.rel_url.raw_path_qs
    # The body is read whole before the upstream is asked (as nginx buffers it): a client
    # sending it a byte at a time holds none of the upstream's connections, one that
    # cannot send it is answered here, and what aiohttp decoded (Content-Encoding) is
    # sent decoded, and bounded.
    body = await _read(request, settings.gateway_max_body) if request.body_exists else None
    headers = _forwarded_headers(request, settings, allowed, ip)
    exchange = asyncio.ensure_future(_exchange(request, session, target, headers, body, nonce))
    # A client that leaves is not waited for: its upstream request is cancelled, and its
    # connection goes back to the connector (aiohttp does not cancel a handler whose
    # client has gone).
    gone = asyncio.ensure_future(_client_gone(request))
    try:
        await asyncio.wait((exchange, gone), return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not exchange.done():
            exchange.cancel()
    if not exchange.done() or exchange.cancelled():
        log.info("http.client_disconnected", path=request.path, ip=ip)
        return web.Response(status=CLIENT_CLOSED_REQUEST)
    return exchange.result()


async def _client_gone(request: web.Request) -> None:
    """Returns once the client's connection is closed (never, under a server other than
    Tollgate's own, which may cancel the handler itself)."""
    protocol = request.protocol
    if isinstance(protocol, ConnectionWatch):
        await asyncio.shield(protocol.lost())  # one future a connection, for every request
    else:
        await asyncio.Event().wait()


async def _exchange(
    request: web.Request,
    session: aiohttp.ClientSession,
    target: str,
    headers: CIMultiDict[str],
    body: bytes | None,
    nonce: dict[str, str],
) -> web.StreamResponse:
    settings = request.app[SETTINGS]
    try:
        async with session.request(
            request.method, target, headers=headers, data=body, allow_redirects=False
        ) as upstream:
            response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
            hop = _hop_by_hop(upstream.headers)
            for key, value in upstream.headers.items():
                if key.lower() in hop or (
                    key.lower() == "set-cookie" and value.lstrip().startswith(TOLLGATE_COOKIES)
                ):
                    continue  # Tollgate's cookies (its session) are not the upstream's to set
                response.headers.add(key, value)
            response.headers.update(nonce)  # Tollgate's, whatever the upstream said
            # Sent at prepare(), before the request's observer could add it after the
            # handler: the id that names the request's log line (and the upstream's, which
            # got it too)
            response.headers[REQUEST_ID_HEADER] = request[REQUEST_ID]
            if upstream.content_length is not None:
                response.content_length = upstream.content_length
            elif request.version < aiohttp.HttpVersion11:
                response.force_close()  # HTTP/1.0 without a length: the close ends the body
            await response.prepare(request)
            await _relay(request, upstream, response, settings.body_timeout)
            return response
    except aiohttp.ConnectionTimeoutError:  # no connection (none free, or no answer)
        raise BadGateway("the upstream API could not be reached in time") from None
    except TimeoutError:  # aiohttp's read timeout is one too
        timeout = settings.upstream_timeout
        raise GatewayTimeout(f"the upstream API said nothing for {timeout:g} s") from None
    except aiohttp.ClientError as exc:
        raise BadGateway(f"the upstream API did not answer: {type(exc).__name__}") from None


async def _read(request: web.Request, limit: int) -> bytes:
    """The body, after the 100 Continue a client that asked for one waits for (the
    request allowed, its length within `limit`: a longer one is refused unsent)."""
    if request.content_length is None or request.content_length <= limit:
        await expectation(request)
    return await read_body(request, limit, any_coding=True)  # the upstream's to decode


def _forwarded_headers(
    request: web.Request, settings: Settings, allowed: Allowed, ip: str
) -> CIMultiDict[str]:
    """The caller's header fields, each line of a repeated one kept (RFC 9110 §5.3), less
    what ends here or is Tollgate's to say, and what Tollgate says."""
    hop = _hop_by_hop(request.headers)
    proxied = peer_trusted(request, settings.trusted_proxies)
    decoded = _decoded_encoding(request)
    headers: CIMultiDict[str] = CIMultiDict()
    for key, value in request.headers.items():
        name = key.lower()
        dashed = name.replace("_", "-")
        if name in hop or dashed in NOT_FORWARDED or (decoded and name == "content-encoding"):
            continue  # the body goes as read: decoded, its length aiohttp's to set
        if name == "expect":
            continue  # answered here (100 Continue), and the body is in hand
        if dashed in PROXY_CONTEXT and not (proxied and name == dashed):
            continue
        if name == "cookie":
            value = _without_tollgate_cookies(value)
            if not value:
                continue
        headers.add(key, value)
    if not proxied:  # what Tollgate knows of itself: its issuer, never the caller's Host
        headers["X-Forwarded-Host"], headers["X-Forwarded-Proto"] = _issuer_parts(settings.issuer)
    headers["X-Tollgate-Company"] = allowed.token.company_id
    headers["X-Tollgate-Client"] = allowed.token.client_id
    headers["X-Tollgate-Permissions"] = " ".join(sorted(allowed.permissions))
    headers["X-Forwarded-For"] = ip  # as Tollgate decided it, trusted proxies honoured
    headers[REQUEST_ID_HEADER] = request[REQUEST_ID]  # the caller's, or the one made here
    return headers


#: the codings aiohttp decodes as it reads a request's body (its parser, `auto_decompress`)
_DECODED = frozenset({"gzip", "deflate", "br", "zstd"})


def _decoded_encoding(request: web.Request) -> bool:
    """Whether the body was read decoded: its one Content-Encoding is one aiohttp decodes."""
    return content_coding(request) in _DECODED


@functools.lru_cache(maxsize=4)
def _issuer_parts(issuer: str) -> tuple[str, str]:
    """The issuer's host and scheme, split once, not on every proxied request."""
    public = urlsplit(issuer)
    return public.netloc, public.scheme


def _without_tollgate_cookies(value: str) -> str:
    """A Cookie line without Tollgate's own cookies (its session, its forms' tokens): a
    browser signed in to the dashboard sends them on every request to this host, and the
    upstream is not to hold a credential of Tollgate's."""
    kept = [c for c in value.split(";") if not c.strip().startswith(TOLLGATE_COOKIES)]
    return ";".join(kept).strip()


async def _relay(
    request: web.Request,
    upstream: aiohttp.ClientResponse,
    response: web.StreamResponse,
    write_timeout: float,
) -> None:
    """The upstream's body to the client. Once the status line is out no other answer can
    follow: if the upstream breaks off, the connection is closed unfinished, which tells
    the client the body is incomplete (RFC 9112 §8) once it has read what came; if the
    client reads nothing for `write_timeout`, it is reset. Either way the upstream's
    connection is let go."""
    stalled = False
    try:
        async for chunk in upstream.content.iter_chunked(64 * 1024):
            try:
                async with asyncio.timeout(write_timeout):
                    await response.write(chunk)
            except TimeoutError:
                stalled = True
                raise
        await response.write_eof()
    except (aiohttp.ClientError, TimeoutError, ConnectionError) as exc:
        log.warning(
            "gateway.response_cut", path=request.path, status=response.status,
            error=type(exc).__name__, client_stalled=stalled,
        )  # fmt: skip
        response.force_close()
        transport = request.transport
        if transport is None:
            return
        if not stalled:
            transport.close()  # what came goes out first, then the end
            return
        # Reset: a close waits for the buffer to drain, which a client that reads nothing
        # never lets happen, and even an abort leaves the kernel holding its unsent bytes
        # (and the client waiting for them). SO_LINGER 0 sends a reset and drops them.
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET)
        transport.abort()
