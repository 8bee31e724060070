"""The OAuth endpoints: token (RFC 6749), revocation (RFC 7009), introspection
(RFC 7662) and server metadata (RFC 8414)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar
from urllib.parse import urlsplit

import msgspec
from aiohttp import web
from multidict import MultiDictProxy

from service.context import Context
from service.domain import credentials, streams
from service.domain.client_keys import AUTH_METHODS, NONE, SIGNING_ALGORITHMS
from service.domain.dpop import ALGORITHMS as DPOP_ALGORITHMS
from service.domain.dpop import NONCE_HEADER, InvalidDpopProof
from service.domain.state import AppState
from service.errors import TollgateError
from service.eventlog import ConcurrencyError, Metadata
from service.oauth import assertions, revocation
from service.oauth import credentials as authorization
from service.oauth.clients import (
    AssertionCheck,
    ClientAuth,
    Public,
    allowed_or_refused,
    authenticate,
    client_credentials,
    client_metadata,
)
from service.oauth.dpop import Nonces, Presented
from service.oauth.errors import (
    NO_STORE,
    InvalidBearerKey,
    InvalidClient,
    InvalidRequest,
    OAuthError,
    TemporarilyUnavailable,
)
from service.web.bodies import (
    form_body,
    no_repeated_keys,
    read_body,
    refuse_repeats,
    urlencoded_fields,
)
from service.web.keys import CONTEXT, authorization_header, metadata

routes = web.RouteTableDef()
T = TypeVar("T")

MAX_PARAMS_BODY = 16 * 1024
URLENCODED = "application/x-www-form-urlencoded"
PARAMS_TYPES = (URLENCODED, "multipart/form-data", "application/json")
#: tries of a revocation whose application changed after its client was authenticated
ATTEMPTS = 3
_json_object_of_strings = msgspec.json.Decoder(dict[str, str])
_encode = msgspec.json.Encoder().encode


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
        body = await _in_oauth_shape(read_body(request, MAX_PARAMS_BODY))
        params = _json_params(body)
        _said_as_oauth(no_repeated_keys, body)
        return params
    if ctype == URLENCODED:  # what every client but curl --form sends: its fields at once
        fields = await _in_oauth_shape(_urlencoded_fields(request))
        params = dict(fields)
        if len(params) < len(fields):
            _said_as_oauth(refuse_repeats, fields)
        return params
    return _form_params(await _in_oauth_shape(form_body(request, MAX_PARAMS_BODY)))


async def _urlencoded_fields(request: web.Request) -> list[tuple[str, str]]:
    body = await read_body(request, MAX_PARAMS_BODY)
    return urlencoded_fields(body, request.charset or "utf-8")


async def _in_oauth_shape(reading: Awaitable[T]) -> T:
    """An unreadable or oversized body, said in the RFC 6749 §5.2 shape (never cached) like
    every other error at these endpoints, not in the admin API's shape (413, cacheable)."""
    try:
        return await reading
    except TollgateError as exc:
        raise InvalidRequest(exc.description) from None


def _json_params(body: bytes) -> dict[str, str]:
    try:
        return _json_object_of_strings.decode(body)
    except msgspec.DecodeError as exc:
        raise InvalidRequest(f"the JSON body must be an object of strings: {exc}") from None


def _said_as_oauth(check: Callable[[T], object], given: T) -> None:
    """`check(given)`, its refusal in the RFC 6749 §5.2 shape (as `_in_oauth_shape`)."""
    try:
        check(given)
    except TollgateError as exc:
        raise InvalidRequest(exc.description) from None


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


def _client(request: web.Request, params: dict[str, str]) -> tuple[ClientAuth | None, Metadata]:
    """The credentials the client authenticates with, and the request's metadata."""
    found = client_credentials(authorization_header(request, InvalidRequest), params)
    return found, client_metadata(metadata(request, "client:"), found)


#: what names the client in the body, when it authenticates there (RFC 6749 §2.3.1,
#: RFC 7521 §4.2, or a public client's client_id alone)
_IN_BODY = ("client_secret", "client_assertion", "client_assertion_type", "client_id")


def _challenged_as_sent(request: web.Request, params: dict[str, str], exc: InvalidClient) -> None:
    """`exc` made what RFC 6749 §5.2 asks: an `invalid_client` answers a client that used
    the Authorization header with 401 and the Basic challenge, and a request with no
    credentials at all too (the challenge says how to authenticate); a client that
    authenticated in the body (a secret, an assertion, its client_id alone) gets 400 and the
    error, without a challenge (a 401 must carry one, RFC 9110 §15.5.2). Strict clients
    read a challenge as the answer: oauth4webapi reported a WWWAuthenticateChallengeError
    for a Basic scheme the client never used, and the error body went unread. Called where
    the error is caught: a context manager cost every token request a generator."""
    if "Authorization" not in request.headers and any(params.get(k) for k in _IN_BODY):
        exc.headers = {k: v for k, v in exc.headers.items() if k != "WWW-Authenticate"}
        exc.status = 400


#: RFC 7662 §2.1 asks for authorization; a client_id alone is none
_NO_INTROSPECTION = "introspection needs client authentication; a public client has none"


async def _authenticated(
    request: web.Request,
    ctx: Context,
    params: dict[str, str],
    endpoint: str,
    *,
    again: bool = False,
) -> tuple[AppState, Metadata]:
    """The calling client, authenticated as at the token endpoint and held to its allow
    list; a client assertion may name this endpoint as its audience too. `again`: the same
    request authenticated a second time (the application changed): an assertion's single
    use is recorded already."""
    try:
        client, meta = _client(request, params)
        if isinstance(client, Public) and endpoint == "introspect":
            raise InvalidClient(_NO_INTROSPECTION)
        audiences = assertions.audiences(
            ctx.settings.issuer, request.path, ctx.settings.assertion_audience
        )
        check = AssertionCheck(audiences, record_use=not again)
        app = await authenticate(ctx.lookups, ctx.ledger, client, meta, check)
        if app.auth_method == NONE and endpoint == "introspect":
            # However it was named: Basic with an empty password names a public client too
            raise InvalidClient(_NO_INTROSPECTION)
    except InvalidClient as exc:
        _challenged_as_sent(request, params, exc)
        raise
    await allowed_or_refused(ctx.ledger, app, meta, endpoint)
    return app, meta


@routes.post("/oauth/token")
async def token(request: web.Request) -> web.Response:
    ctx = request.app[CONTEXT]
    nonces = ctx.dpop_nonces
    if nonces is None:
        return await _token(request, ctx)
    if "DPoP" not in request.headers:
        try:
            return await _token(request, ctx)
        except InvalidDpopProof as exc:
            # A proof is needed (a client held to DPoP sent none): with the nonce it must
            # carry, its next request can be the one that succeeds (RFC 9449 §8).
            exc.headers = {NONCE_HEADER: await nonces.current()} | exc.headers
            raise
    # DPOP_NONCE=required: every answer to a DPoP request names the nonce to use next
    # (RFC 9449 §8.2), an error's too; a use_dpop_nonce names the one it asks for.
    nonce = {NONCE_HEADER: await nonces.current()}
    try:
        response = await _token(request, ctx, nonces)
    except OAuthError as exc:
        exc.headers = nonce | exc.headers
        raise
    response.headers.update(nonce)
    return response


async def _token(request: web.Request, ctx: Context, nonces: Nonces | None = None) -> web.Response:
    params = await oauth_params(request)
    header = authorization_header(request, InvalidRequest)
    presented = dpop_presented(request, f"{ctx.settings.issuer}/oauth/token", nonces)
    try:
        issued = await ctx.token_endpoint.token(
            params, header, metadata(request, "client:"), presented
        )
    except InvalidClient as exc:
        _challenged_as_sent(request, params, exc)
        raise
    # Encoded by msgspec: json_response's stdlib encoder took 3 us of every token.
    body = _encode(issued.body())
    return web.Response(body=body, content_type="application/json", headers=NO_STORE)


def dpop_presented(
    request: web.Request, public_url: str, nonces: Nonces | None = None
) -> Presented | None:
    """The request's DPoP proof (RFC 9449 §4.1), with its method and public URL; None
    without one. More than one DPoP header is refused (RFC 9449 §4.3 item 1). `nonces`:
    the nonces the proof must carry one of (DPOP_NONCE=required)."""
    found = request.headers.getall("DPoP", [])
    if not found:
        return None
    if len(found) > 1:
        raise InvalidDpopProof("send exactly one DPoP header")
    return Presented(found[0], request.method, public_url, nonces)


@routes.post("/oauth/revoke")
async def revoke(request: web.Request) -> web.Response:
    """RFC 7009: 200 whether or not the token was known, live, or this client's."""
    ctx = request.app[CONTEXT]
    params = await oauth_params(request)
    for attempt in range(ATTEMPTS):
        app, meta = await _authenticated(request, ctx, params, "revoke", again=attempt > 0)
        token = params.get("token")
        if not token:
            raise InvalidRequest("token is required")
        try:
            await revocation.revoke(
                ctx.lookups, ctx.ledger, app.client_id, token, meta, app_version=app.version
            )
        except ConcurrencyError as exc:
            if exc.stream_id != streams.application(app.client_id):
                raise
            # The application changed after this process authenticated the client (a
            # rotation in another process, say): authenticated again on what it is now.
            await ctx.lookups.catch_up()
            continue
        return web.Response(status=200, headers=NO_STORE)
    raise TemporarilyUnavailable("the application keeps changing; try again")


@routes.post("/oauth/introspect")
async def introspect(request: web.Request) -> web.Response:
    """RFC 7662. Callers: a resource server (Bearer key) or the token's own client."""
    ctx = request.app[CONTEXT]
    params = await oauth_params(request)
    found = authorization.parse(authorization_header(request, InvalidRequest))
    caller_client: str | None = None
    if isinstance(found, authorization.Bearer):
        if await ctx.lookups.resource_server(credentials.digest(found.value)) is None:
            raise InvalidBearerKey()
    else:
        app, _ = await _authenticated(request, ctx, params, "introspect")
        caller_client = app.client_id
    token = params.get("token")
    if not token:
        raise InvalidRequest("token is required")
    answer = await ctx.introspection.introspect(token, caller_client)
    if answer["active"]:
        answer = answer | {"iss": ctx.settings.issuer}  # RFC 7662 §2.2
    return web.json_response(answer, headers=NO_STORE)


@routes.get("/.well-known/oauth-authorization-server/{issuer_path:.+}")
async def server_metadata_of_path(request: web.Request) -> web.StreamResponse:
    """RFC 8414 §3.1: the metadata of an issuer with a path (a PUBLIC_URL such as
    `https://example.com/auth`) lives at the well-known URI with that path after it, which a
    client such as oauth4webapi asks for. Any other path is not an issuer here."""
    path = urlsplit(request.app[CONTEXT].settings.issuer).path.strip("/")
    if not path or request.match_info["issuer_path"].strip("/") != path:
        raise web.HTTPNotFound()
    return await server_metadata(request)


@routes.get("/.well-known/oauth-authorization-server")
async def server_metadata(request: web.Request) -> web.Response:
    """RFC 8414 §2."""
    ctx = request.app[CONTEXT]
    issuer = ctx.settings.issuer
    auth_methods = list(AUTH_METHODS)  # "none": public clients (RFC 8252), which may revoke
    authenticated = [m for m in auth_methods if m != NONE]
    signing = list(SIGNING_ALGORITHMS)
    return web.json_response(
        {
            "issuer": issuer,
            "authorization_endpoint": f"{issuer}/oauth/authorize",
            "token_endpoint": f"{issuer}/oauth/token",
            "revocation_endpoint": f"{issuer}/oauth/revoke",
            "introspection_endpoint": f"{issuer}/oauth/introspect",
            "response_types_supported": ["code"],
            "response_modes_supported": ["query"],
            "grant_types_supported": ctx.token_endpoint.grant_types,
            "token_endpoint_auth_methods_supported": auth_methods,
            "token_endpoint_auth_signing_alg_values_supported": signing,
            "revocation_endpoint_auth_methods_supported": auth_methods,
            "revocation_endpoint_auth_signing_alg_values_supported": signing,
            # Resource servers also send a Bearer key, which has no registered method name
            # (RFC 8414 §2 points at the IANA registry): only registered names are listed.
            "introspection_endpoint_auth_methods_supported": authenticated,
            "introspection_endpoint_auth_signing_alg_values_supported": signing,
            "authorization_response_iss_parameter_supported": True,  # RFC 9207 §3
            "code_challenge_methods_supported": ["S256"],
            "dpop_signing_alg_values_supported": list(DPOP_ALGORITHMS),  # RFC 9449 §5.1
            "scopes_supported": sorted(ctx.catalogue),
        }
    )
