"""The OAuth endpoints: token (RFC 6749), revocation (RFC 7009), introspection
(RFC 7662) and server metadata (RFC 8414)."""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import msgspec
from aiohttp import web
from multidict import MultiDictProxy

from projections.memory import AppState
from service import events as ev
from service import policy
from service.context import Context
from service.domain import credentials
from service.errors import TollgateError
from service.eventlog import Metadata
from service.oauth import grants, tokens
from service.oauth.clients import authenticate, credentials_from
from service.oauth.errors import (
    NO_STORE,
    InvalidBearerKey,
    InvalidClient,
    InvalidRequest,
    IpNotAllowed,
    TemporarilyUnavailable,
    UnsupportedGrantType,
)
from service.web.bodies import form_body, read_body
from service.web.keys import CONTEXT, metadata

routes = web.RouteTableDef()
T = TypeVar("T")

MAX_PARAMS_BODY = 16 * 1024
GRANT_TYPES = ("client_credentials", "authorization_code", "refresh_token")
PARAMS_TYPES = ("application/x-www-form-urlencoded", "multipart/form-data", "application/json")
_json_object_of_strings = msgspec.json.Decoder(dict[str, str])


async def oauth_params(request: web.Request) -> dict[str, str]:
    """The body as parameters: form-urlencoded, multipart/form-data (curl --form) or JSON.
    A parameter sent twice is refused: "Request and response parameters MUST NOT be
    included more than once." https://www.rfc-editor.org/rfc/rfc6749#section-3.1"""
    ctype = request.content_type
    if ctype not in PARAMS_TYPES:
        raise InvalidRequest(
            "send the parameters as application/x-www-form-urlencoded, "
            "multipart/form-data or application/json"
        )
    if ctype == "application/json":
        return _json_params(await _in_oauth_shape(read_body(request, MAX_PARAMS_BODY)))
    return _form_params(await _in_oauth_shape(form_body(request, MAX_PARAMS_BODY)))


async def _in_oauth_shape(reading: Awaitable[T]) -> T:
    """An unreadable or oversized body, said in the RFC 6749 §5.2 shape (never cached) like
    every other error at these endpoints, not in the admin API's shape (413, cacheable)."""
    try:
        return await reading
    except TollgateError as exc:
        raise InvalidRequest(exc.description) from None


def _json_params(body: bytes) -> dict[str, str]:
    try:
        params = _json_object_of_strings.decode(body)
    except msgspec.DecodeError as exc:
        raise InvalidRequest(f"the JSON body must be an object of strings: {exc}") from None
    # msgspec keeps the last of a repeated key; parse again only to see the repeats.
    json.loads(body, object_pairs_hook=_refuse_repeats)
    return params


def _refuse_repeats(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: set[str] = set()
    for key, _value in pairs:
        if key in seen:
            raise InvalidRequest(f"{key} is given more than once")
        seen.add(key)
    return dict(pairs)


def _form_params(form: MultiDictProxy[str | bytes | bytearray | web.FileField]) -> dict[str, str]:
    params: dict[str, str] = {}
    for key in form:
        values = form.getall(key)
        if len(values) > 1:
            raise InvalidRequest(f"{key} is given more than once")
        if not isinstance(values[0], str):
            raise InvalidRequest(f"{key} must be a plain value, not a file")
        params[key] = values[0]
    return params


async def _client(
    request: web.Request, ctx: Context, params: dict[str, str]
) -> tuple[AppState, Metadata]:
    found = credentials_from(request.headers.get("Authorization"), params)
    if found is None:
        raise InvalidClient("client authentication is required")
    client_id, secret = found
    meta = metadata(request, f"client:{client_id[:64]}")
    app = await authenticate(ctx, client_id, secret, meta.client_ip or "", meta)
    return app, meta


async def _allowed_or_refused(ctx: Context, app: AppState, meta: Metadata, endpoint: str) -> None:
    ip = meta.client_ip or ""
    if not policy.ip_allowed(app, ip):
        await policy.record_violation(ctx, app, ip, endpoint, meta)
        raise IpNotAllowed(f"requests for this client are not allowed from {ip}")  # 403


Grant = Callable[[Context, AppState, dict[str, str], Metadata], Awaitable[grants.Issued]]

_GRANTS: dict[str, Grant] = {
    "client_credentials": lambda ctx, app, p, meta: grants.client_credentials(
        ctx, app, p.get("scope"), meta
    ),
    "authorization_code": lambda ctx, app, p, meta: grants.authorization_code(
        ctx, app, p.get("code"), p.get("redirect_uri"), p.get("code_verifier"), meta
    ),
    "refresh_token": lambda ctx, app, p, meta: grants.refresh_token(
        ctx, app, p.get("refresh_token"), p.get("scope"), meta
    ),
}


@routes.post("/oauth/token")
async def token(request: web.Request) -> web.Response:
    ctx = request.app[CONTEXT]
    params = await oauth_params(request)
    grant_type = params.get("grant_type")
    if not grant_type:
        raise InvalidRequest("grant_type is required")
    grant = _GRANTS.get(grant_type)
    if grant is None:
        raise UnsupportedGrantType(f"supported: {', '.join(GRANT_TYPES)}")
    for _attempt in range(3):
        app, meta = await _client(request, ctx, params)
        await _allowed_or_refused(ctx, app, meta, "token")
        try:
            issued = await grant(ctx, app, params, meta)
        except grants.ApplicationChanged:
            await ctx.refresh()  # a rotation (or another change) committed first: look again
            continue
        return web.json_response(issued.body(), headers=NO_STORE)
    raise TemporarilyUnavailable("the application keeps changing; try again")


def _family_of(ctx: Context, token: str) -> str | None:
    if tokens.well_formed(token, tokens.ACCESS):
        key = bytes.fromhex(tokens.token_hash(token))
        state = ctx.policy.tokens.get(key)
        return None if state is None else ctx.policy.family_of(key, state)
    if tokens.well_formed(token, tokens.REFRESH):
        return ctx.policy.refresh_tokens.get(tokens.token_hash(token))
    return None


@routes.post("/oauth/revoke")
async def revoke(request: web.Request) -> web.Response:
    """RFC 7009: 200 whether or not the token was known, live, or this client's."""
    ctx = request.app[CONTEXT]
    params = await oauth_params(request)
    app, meta = await _client(request, ctx, params)
    token = params.get("token")
    if not token:
        raise InvalidRequest("token is required")
    family_id = _family_of(ctx, token)
    if family_id is None:
        await ctx.refresh()
        family_id = _family_of(ctx, token)
    owner = ctx.policy.family_owner(family_id) if family_id else None
    if owner is not None and family_id is not None and owner[0] == app.client_id:
        event = ev.TokenRevoked(
            company_id=owner[1],
            client_id=app.client_id,
            family_id=family_id,
            reason="client_request",
            token_hash=tokens.token_hash(token),
        )
        await ctx.record(f"token-{family_id}", None, [event], meta)
        ctx.count("token_revoked", "client_request")
    return web.Response(status=200, headers=NO_STORE)


INACTIVE = {"active": False}


@routes.post("/oauth/introspect")
async def introspect(request: web.Request) -> web.Response:
    """RFC 7662. Callers: a resource server (Bearer key) or the token's own client."""
    ctx = request.app[CONTEXT]
    params = await oauth_params(request)
    caller_client: str | None = None
    header = request.headers.get("Authorization", "")
    if header[:7].lower() == "bearer ":
        server = ctx.directory.resource_server_hashes.get(credentials.digest(header[7:].strip()))
        if server is None:
            await ctx.refresh()
            server = ctx.directory.resource_server_hashes.get(
                credentials.digest(header[7:].strip())
            )
        if server is None:
            raise InvalidBearerKey()
    else:
        app, _ = await _client(request, ctx, params)
        caller_client = app.client_id
    token = params.get("token")
    if not token:
        raise InvalidRequest("token is required")
    return web.json_response(await _introspection(ctx, token, caller_client), headers=NO_STORE)


async def _introspection(ctx: Context, token: str, caller_client: str | None) -> dict[str, Any]:
    if caller_client is not None and tokens.well_formed(token, tokens.REFRESH):
        return await _refresh_introspection(ctx, token, caller_client)
    if not tokens.well_formed(token, tokens.ACCESS):
        return INACTIVE
    key = bytes.fromhex(tokens.token_hash(token))
    state = ctx.policy.token(key, time.time())
    if state is None:
        await ctx.refresh()
        state = ctx.policy.token(key, time.time())
    if state is None or (caller_client is not None and state.client_id != caller_client):
        return INACTIVE
    return _active(
        ctx.policy.effective_permissions(state), state.client_id, "Bearer", state.company_id,
        state.expires_at,
    )  # fmt: skip


async def _refresh_introspection(ctx: Context, token: str, caller_client: str) -> dict[str, Any]:
    """A refresh token, for its own client only: a resource server never has one to check,
    and one that answered `active` to a refresh token could take it for an access token."""
    refresh_hash = tokens.token_hash(token)
    # Rare, and must be exact: a rotation a moment ago (in any process) has spent it.
    await ctx.refresh()
    family_id = ctx.policy.refresh_tokens.get(refresh_hash)
    family = ctx.policy.families.get(family_id) if family_id is not None else None
    if family is None or family.client_id != caller_client:
        return INACTIVE
    if family.refresh_token_hash != refresh_hash:  # spent: using it would revoke the family
        return INACTIVE
    if family.refresh_expires_at is not None and family.refresh_expires_at <= time.time():
        return INACTIVE
    app = ctx.policy.apps.get(family.client_id)
    connection = ctx.policy.connections.get((family.company_id, family.client_id))
    if app is None or connection is None:
        return INACTIVE
    granted = family.permissions & app.permissions & connection.permissions  # a refresh now
    return _active(
        granted, family.client_id, "refresh_token", family.company_id, family.refresh_expires_at
    )


def _active(
    scope: frozenset[str], client_id: str, token_type: str, company_id: str, exp: int | None
) -> dict[str, Any]:
    """RFC 7662 §2.2: what an active token's introspection says."""
    body: dict[str, Any] = {
        "active": True,
        "scope": " ".join(sorted(scope)),
        "client_id": client_id,
        "token_type": token_type,
        "sub": company_id,
        "company_id": company_id,
    }
    if exp is not None:
        body["exp"] = exp
    return body


@routes.get("/.well-known/oauth-authorization-server")
async def server_metadata(request: web.Request) -> web.Response:
    """RFC 8414 §2."""
    ctx = request.app[CONTEXT]
    issuer = ctx.settings.issuer
    auth_methods = ["client_secret_basic", "client_secret_post"]
    return web.json_response(
        {
            "issuer": issuer,
            "authorization_endpoint": f"{issuer}/oauth/authorize",
            "token_endpoint": f"{issuer}/oauth/token",
            "revocation_endpoint": f"{issuer}/oauth/revoke",
            "introspection_endpoint": f"{issuer}/oauth/introspect",
            "response_types_supported": ["code"],
            "response_modes_supported": ["query"],
            "grant_types_supported": list(GRANT_TYPES),
            "token_endpoint_auth_methods_supported": auth_methods,
            "revocation_endpoint_auth_methods_supported": auth_methods,
            "introspection_endpoint_auth_methods_supported": [*auth_methods, "bearer"],
            "code_challenge_methods_supported": ["S256"],
            "scopes_supported": sorted(ctx.catalogue),
        }
    )
