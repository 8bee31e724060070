"""The gateway, /api/{path}: the policy decision, then the request goes to the upstream
API (streamed both ways) with headers naming the company, client and permissions."""

from __future__ import annotations

import re
from datetime import UTC, datetime

import aiohttp
import msgspec
from aiohttp import web

from service.domain.policy import Allowed
from service.errors import InvalidRequest, TollgateError
from service.oauth import credentials as authorization
from service.oauth.errors import InvalidToken
from service.web.keys import CONTEXT, ROUTES, SETTINGS, UPSTREAM, caller_ip, metadata

routes = web.RouteTableDef()

IDENTITY_HEADERS = ("X-Tollgate-Company", "X-Tollgate-Client", "X-Tollgate-Permissions")
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


def bearer_token(request: web.Request) -> str:
    found = authorization.parse(request.headers.get("Authorization"))
    if found is None:
        raise InvalidToken("an access token is required", sent=False)
    if not isinstance(found, authorization.Bearer):
        # Another scheme is no attempt at a Bearer token: no error code (RFC 6750 §3.1).
        raise InvalidToken("use Authorization: Bearer <access token>", sent=False)
    return found.value


_ENCODED_SEPARATOR = re.compile(r"%(2f|5c)", re.IGNORECASE)


def canonical_path(request: web.Request) -> str:
    """The path the permission is decided on is the path the upstream gets: one with a
    `.`/`..` segment or an empty one (`//`) could mean another route there, so it is
    refused rather than normalised."""
    segments = request.path.split("/")[1:]
    if any(s in (".", "..") for s in segments) or "" in segments[:-1]:
        raise InvalidRequest("the path has empty, '.' or '..' segments")
    # Decided on the decoded path, forwarded raw: an encoded "/" (or a "\", which some
    # servers read as one) would split segments differently upstream.
    if "\\" in request.path or _ENCODED_SEPARATOR.search(request.rel_url.raw_path):
        raise InvalidRequest("the path has an encoded '/' or a '\\'")
    return request.path


@routes.route("*", "/api/{path:.*}")
async def gateway(request: web.Request) -> web.StreamResponse:
    ctx = request.app[CONTEXT]
    path = canonical_path(request)
    raw = bearer_token(request)
    ip = caller_ip(request)
    permission = request.app[ROUTES].permission_for(request.method, path)
    meta = metadata(request, "gateway", ip)
    allowed = await ctx.policy_point.decide(raw, ip, permission, "api", meta)
    upstream = request.app[UPSTREAM].session
    if upstream is None:
        return _builtin(request, allowed)
    return await _proxy(request, upstream, allowed, ip)


def _builtin(request: web.Request, allowed: Allowed) -> web.Response:
    if request.path != "/api/v1/whoami" or request.method not in ("GET", "HEAD"):
        raise web.HTTPNotFound(reason="no upstream API is configured; try GET /api/v1/whoami")
    token = allowed.token
    expires = token.expires_at
    expires_at = None if expires is None else datetime.fromtimestamp(expires, UTC).isoformat()
    body = {
        "company_id": token.company_id,
        "client_id": token.client_id,
        "permissions": sorted(allowed.permissions),
        "expires_at": expires_at,
    }
    return web.Response(body=msgspec.json.encode(body), content_type="application/json")


async def _proxy(
    request: web.Request, session: aiohttp.ClientSession, allowed: Allowed, ip: str
) -> web.StreamResponse:
    settings = request.app[SETTINGS]
    assert settings.upstream_url is not None
    target = settings.upstream_url.rstrip("/") + request.rel_url.raw_path_qs
    headers = {
        k: v
        for k, v in request.headers.items()
        if k.lower() not in HOP_BY_HOP
        and k.lower() != "authorization"
        and k.lower() not in {h.lower() for h in IDENTITY_HEADERS}
    }
    headers["X-Tollgate-Company"] = allowed.token.company_id
    headers["X-Tollgate-Client"] = allowed.token.client_id
    headers["X-Tollgate-Permissions"] = " ".join(sorted(allowed.permissions))
    # The caller's address as Tollgate decided it (trusted proxies honoured): a chain the
    # caller sent itself could be forged, so it is not passed on.
    headers["X-Forwarded-For"] = ip
    body = request.content if request.body_exists else None
    try:
        async with session.request(
            request.method, target, headers=headers, data=body, allow_redirects=False
        ) as upstream:
            response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
            for key, value in upstream.headers.items():
                if key.lower() not in HOP_BY_HOP:
                    response.headers.add(key, value)
            if upstream.content_length is not None:
                response.content_length = upstream.content_length
            await response.prepare(request)
            async for chunk in upstream.content.iter_chunked(64 * 1024):
                await response.write(chunk)
            await response.write_eof()
            return response
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise BadGateway(f"the upstream API did not answer: {type(exc).__name__}") from None
