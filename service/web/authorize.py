"""GET/POST /oauth/authorize: sign-in, consent, and the redirect with a code
(RFC 6749 §4.1, PKCE per RFC 7636, the redirect rules of RFC 9700 §4.1)."""

from __future__ import annotations

import hmac
import re
import time
from dataclasses import dataclass
from urllib.parse import urlencode

from aiohttp import web
from multidict import MultiDict, MultiMapping
from yarl import URL

from projections.directory import User
from service.context import Context
from service.domain import consent, credentials, native_apps, streams
from service.domain import grants as grant_rules
from service.domain.applications import AUTHORIZATION_CODE, followable
from service.domain.state import AppState
from service.errors import Conflict, TollgateError, rfc6749_text
from service.eventlog import ConcurrencyError, Metadata
from service.oauth import tokens
from service.web import pages, sessions
from service.web.auth import signed_in
from service.web.bodies import form_body
from service.web.keys import CONTEXT, metadata
from service.web.login import InvalidCredentials, authenticate, set_session_cookie

routes = web.RouteTableDef()

LOGIN_CSRF_COOKIE = "tg_login_csrf"
#: BASE64URL(SHA256(code_verifier)) (RFC 7636 §4.2), the only method taken: 32 bytes are 43
#: characters, the last holding 2 bits (and 4 of zeros)
_CHALLENGE = re.compile(r"^[A-Za-z0-9_-]{42}[AEIMQUYcgkosw048]\Z")
_CONSENT_ATTEMPTS = 5
_THUMBPRINT = re.compile(r"^[A-Za-z0-9_-]{43}\Z")  # a SHA-256 JWK thumbprint (RFC 7638)
#: request objects, by value and by reference, and their error codes (OpenID Connect Core
#: §3.1.2.6, in the IANA OAuth Extensions Error registry)
_UNSUPPORTED = (("request", "request_not_supported"), ("request_uri", "request_uri_not_supported"))
_PASSED = ("client_id", "redirect_uri", "scope", "state", "code_challenge", "code_challenge_method",
           "dpop_jkt")  # fmt: skip
_HANDED_ON = frozenset(_PASSED)


class PageError(Exception):
    """Shown as a page, never redirected: the client or its redirect URI is not trusted."""

    def __init__(self, title: str, message: str) -> None:
        super().__init__(message)
        self.title = title
        self.message = message


@dataclass(frozen=True)
class AuthorizationRequest:
    app: AppState
    redirect_uri: str
    state: str | None
    permissions: list[str]
    code_challenge: str | None
    dpop_jkt: str | None = None  # RFC 9449 §10: the code is bound to that DPoP key
    #: whether the request named `redirect_uri` (else: the registered one, RFC 6749 §3.1.2.3)
    redirect_uri_given: bool = True

    def fields(self) -> dict[str, str]:
        fields = {"client_id": self.app.client_id, "scope": " ".join(self.permissions)}
        if self.redirect_uri_given:  # handed on as it came: left out, it stays left out
            fields["redirect_uri"] = self.redirect_uri
        if self.state is not None:
            fields["state"] = self.state
        if self.code_challenge is not None:
            fields["code_challenge"] = self.code_challenge
            fields["code_challenge_method"] = "S256"
        if self.dpop_jkt is not None:
            fields["dpop_jkt"] = self.dpop_jkt
        return fields


def redirect_to(uri: str, params: dict[str, str | None], issuer: str) -> web.HTTPFound:
    """The registered URI exactly as registered, with the response parameters added and
    the issuer, so that a client talking to several servers can tell whose answer this is
    (RFC 9207 §2, a mix-up defence). The answer may carry a code: never cached, and the
    client's page is not told where its user came from."""
    given = {k: v for k, v in params.items() if v is not None}
    if "error_description" in given:  # RFC 6749 §4.1.2.1: in §5.2's characters
        given["error_description"] = rfc6749_text(given["error_description"])
    query = urlencode(given | {"iss": issuer})
    headers = {"Cache-Control": "no-store", "Referrer-Policy": "no-referrer"}
    return web.HTTPFound(uri + ("&" if "?" in uri else "?") + query, headers=headers)


async def parse(ctx: Context, params: MultiMapping[str]) -> AuthorizationRequest:
    # Until the client and its redirect URI are known, an error can only be shown here;
    # after, it goes back to the application (RFC 6749 §4.1.2.1).
    repeated = [key for key in dict.fromkeys(params) if len(params.getall(key)) > 1]
    for key in ("client_id", "redirect_uri"):
        if key in repeated:
            raise PageError("Invalid request", f"{key} is given more than once")
    if "client_secret" in params:
        raise PageError(
            "Invalid request",
            "invalid_request: client_secret must never be sent in the authorization URL",
        )
    client_id = params.get("client_id", "")
    app = await ctx.lookups.application(client_id) if client_id else None
    if app is None:
        raise PageError("Unknown application", "this link names no known application")
    if app.grant_type != AUTHORIZATION_CODE or not app.redirect_uri:
        raise PageError("Invalid request", "this application cannot ask users for access")
    redirect_uri = params.get("redirect_uri")
    given = redirect_uri is not None
    if redirect_uri is None:
        if native_apps.redirect_uri_needed(app):
            raise PageError(
                "Invalid redirect URI",
                "redirect_uri is missing: this application's loopback redirect URI needs "
                "the port it listens on (RFC 8252 §7.3)",
            )
        redirect_uri = app.redirect_uri  # its one registered URI (RFC 6749 §3.1.2.3)
    if not native_apps.redirect_matches(app, app.redirect_uri, redirect_uri):
        raise PageError(
            "Invalid redirect URI",
            "the redirect_uri does not match the one registered for this application",
        )
    if not followable(redirect_uri):
        # Registered before the rule (applications.followable): a browser sent there would
        # not go where the page says, and the answer's Location cannot be written.
        raise PageError(
            "Invalid redirect URI",
            "this application's redirect URI is not a valid address: its company must "
            "register a new one",
        )
    # From here on errors go back to the application, with its state (RFC 6749 §4.1.2.1).
    iss = ctx.settings.issuer
    state = None if "state" in repeated else params.get("state")  # which one is it?
    if repeated:
        # RFC 6749 §3.1: a parameter is sent once
        raise _redirect_error(redirect_uri, state, f"{repeated[0]} is given more than once", iss)
    response_type = params.get("response_type")
    if not response_type:  # RFC 6749 §3.1: an empty parameter is an omitted one
        raise _redirect_error(redirect_uri, state, "response_type is required", iss)
    if response_type != "code":
        error = {"error": "unsupported_response_type", "state": state}
        raise redirect_to(redirect_uri, error, iss)
    mode = params.get("response_mode")
    if mode and mode != "query":
        # The client asked to keep the code out of the query (form_post, fragment): an
        # answer in the query anyway would not be what it asked for.
        message = "response_mode must be query, the only one this server answers in"
        raise _redirect_error(redirect_uri, state, message, iss)
    for name, code in _UNSUPPORTED:
        if name in params:
            # Parameters signed in a request object (RFC 9101) would take precedence over
            # the ones beside it: acting on the unsigned ones alone is not what was asked.
            description = f"{name} (RFC 9101) is not supported: send the parameters as such"
            refusal = {"error": code, "error_description": description, "state": state}
            raise redirect_to(redirect_uri, refusal, iss)
    challenge = params.get("code_challenge")
    method = params.get("code_challenge_method")
    if challenge is None and method is not None:
        without = "code_challenge_method without code_challenge"
        raise _redirect_error(redirect_uri, state, without, iss)
    if challenge is None and native_apps.is_public(app):
        needed = "code_challenge is required: a public client uses PKCE (RFC 8252 §8.1)"
        raise _redirect_error(redirect_uri, state, needed, iss)
    if challenge is not None:
        if method != "S256":
            raise _redirect_error(redirect_uri, state, "code_challenge_method must be S256", iss)
        if not _CHALLENGE.match(challenge):
            raise _redirect_error(redirect_uri, state, "malformed code_challenge", iss)
    dpop_jkt = params.get("dpop_jkt")
    if dpop_jkt is not None and not _THUMBPRINT.match(dpop_jkt):
        message = "dpop_jkt must be a JWK SHA-256 thumbprint, base64url (RFC 9449 §10)"
        raise _redirect_error(redirect_uri, state, message, iss)
    try:
        permissions = grant_rules.scope_from(params.get("scope"), app.permissions, app.permissions)
    except TollgateError as exc:
        raise redirect_to(
            redirect_uri,
            {"error": "invalid_scope", "error_description": exc.description, "state": state},
            iss,
        ) from None
    return AuthorizationRequest(
        app, redirect_uri, state, permissions, challenge, dpop_jkt, redirect_uri_given=given
    )


def _redirect_error(uri: str, state: str | None, description: str, iss: str) -> web.HTTPFound:
    error = {"error": "invalid_request", "error_description": description, "state": state}
    return redirect_to(uri, error, iss)


async def _session(request: web.Request, ctx: Context) -> sessions.Session | None:
    found = await signed_in(request, ctx)
    return None if found is None else found[0]


@routes.get("/oauth/authorize")
async def authorize(request: web.Request) -> web.StreamResponse:
    ctx = request.app[CONTEXT]
    try:
        auth_request = await parse(ctx, request.query)
    except PageError as exc:
        return pages.error_page(exc.title, exc.message)
    except web.HTTPFound:
        # An error for the application goes back to it only once the user has signed in:
        # otherwise any registered URI would make this server a redirector for phishing
        # links (RFC 9700 §4.11.2).
        if await _session(request, ctx) is None:
            return _login(request, request.raw_path)
        raise
    session = await _session(request, ctx)
    if session is None:
        return _login(request, request.raw_path)
    return await _consent(request, ctx, auth_request, session)


def _login(
    request: web.Request, next_url: str, message: str | None = None, status: int = 200
) -> web.Response:
    return pages.sign_in_form(
        request, cookie=LOGIN_CSRF_COOKIE, path="/oauth", action="/oauth/login",
        fields={"next": next_url}, message=message, status=status,
        redirect_uri=_registered_redirect(request.app[CONTEXT], next_url),
    )  # fmt: skip


def _registered_redirect(ctx: Context, next_url: str) -> str | None:
    """The registered redirect URI that the authorization request `next_url` names exactly,
    if any. The sign-in form can end there: an error held back until the user signs in
    (see `authorize`) is a redirect to it at the end of the form's redirects, and the
    page's CSP form-action must let the browser follow it."""
    try:
        query = URL(next_url).query
    except ValueError:
        return None
    client_ids, redirect_uris = query.getall("client_id", []), query.getall("redirect_uri", [])
    app = ctx.lookups.application_now(client_ids[0]) if len(client_ids) == 1 else None
    if app is None or app.grant_type != AUTHORIZATION_CODE or not app.redirect_uri:
        return None
    if not redirect_uris and not native_apps.redirect_uri_needed(app):
        return app.redirect_uri  # left out: the one registered (RFC 6749 §3.1.2.3)
    if len(redirect_uris) != 1 or not native_apps.redirect_matches(
        app, app.redirect_uri, redirect_uris[0]
    ):
        return None
    return redirect_uris[0]


def consent_token(request: web.Request) -> str:
    """The consent form's CSRF token: derived from the session cookie, which another site
    can neither read nor send along with a cross-site POST (SameSite=Lax)."""
    return credentials.digest("consent:" + request.cookies.get(sessions.COOKIE, ""))


async def _consent(
    request: web.Request,
    ctx: Context,
    auth_request: AuthorizationRequest,
    session: sessions.Session,
) -> web.Response:
    user = ctx.directory.users[session.user_id]
    company = ctx.directory.companies.get(user.company_id)
    app = auth_request.app
    publisher = ctx.directory.companies.get(app.company_id)
    connection = ctx.lookups.connection(user.company_id, app.client_id)
    held = connection.permissions if connection is not None else frozenset()
    is_admin = user.role == consent.ADMIN
    back = "/oauth/authorize?" + urlencode({"response_type": "code", **auth_request.fields()})
    return pages.consent_page(
        application=app.name,
        company=company.name if company else user.company_id,
        publisher=None
        if app.company_id == user.company_id
        else (publisher.name if publisher else app.company_id),
        user_email=user.email,
        permissions=[(p, ctx.catalogue.get(p, "")) for p in auth_request.permissions],
        fields=auth_request.fields() | {"csrf_token": consent_token(request)},
        redirect_uri=auth_request.redirect_uri,
        is_admin=is_admin,
        admin_only=[] if is_admin else consent.needs_admin(auth_request.permissions, held),
        switch_user={"next": back, "csrf_token": consent_token(request)},
    )


@routes.post("/oauth/switch-user")
async def switch_user(request: web.Request) -> web.StreamResponse:
    """The consent page's "Not you?": sign out, then the same authorization request again
    (which asks to sign in)."""
    ctx = request.app[CONTEXT]
    form = await form_body(request)
    presented, next_url = str(form.get("csrf_token", "")), str(form.get("next", ""))
    # Without a session cookie (another site's post carries none) the expected token would
    # be the same for everyone: nobody is signed in here to switch from.
    if sessions.COOKIE not in request.cookies or not hmac.compare_digest(
        presented.encode(), consent_token(request).encode()
    ):
        return pages.error_page("Request refused", "the form expired; start again", status=403)
    if not next_url.startswith("/oauth/authorize?"):
        next_url = "/oauth/authorize"  # never an open redirect
    value = request.cookies.get(sessions.COOKIE)
    if value:
        await sessions.delete(ctx.pool, value)
    response = web.HTTPSeeOther(next_url)
    response.del_cookie(sessions.COOKIE, path="/")
    raise response


@routes.get("/oauth/login")
async def login_again(request: web.Request) -> web.Response:
    """The address a failed sign-in leaves in the address bar, opened again: the form's
    authorization request is not in it, so the way back is through the application."""
    return pages.error_page(
        "Sign in from the application",
        "This sign-in came from an application asking for access: go back to it and start again.",
        status=200,
    )


@routes.post("/oauth/login")
async def login(request: web.Request) -> web.StreamResponse:
    ctx = request.app[CONTEXT]
    form = await form_body(request)
    email, password = str(form.get("email", "")), str(form.get("password", ""))
    next_url = str(form.get("next", ""))
    if not next_url.startswith("/oauth/authorize?"):
        next_url = "/oauth/authorize"  # never an open redirect
    presented = str(form.get("csrf_token", ""))
    if not pages.login_csrf_ok(request, LOGIN_CSRF_COOKIE, presented):
        return pages.error_page("Session expired", "reload the page and sign in again", status=403)
    try:
        # several companies' accounts: a redirect to choose one, which then goes to next_url
        user = await authenticate(request, email[:320], password[:256], next_url=next_url)
    except InvalidCredentials as exc:
        return _login(request, next_url, exc.description, status=exc.status)
    value, _csrf = await sessions.create(
        ctx.pool, user.user_id, user.company_id, user_version=user.version,
        replacing=request.cookies.get(sessions.COOKIE),
    )  # fmt: skip
    response = web.HTTPSeeOther(next_url)
    set_session_cookie(request, response, value)
    raise response


@routes.post("/oauth/authorize")
async def decide(request: web.Request) -> web.StreamResponse:
    ctx = request.app[CONTEXT]
    # The authorization request's fields, repeated, are refused as the GET refuses them
    # (back to the application when it can be told where); the form's own, here.
    form = await form_body(request, repeatable=_HANDED_ON)
    fields = {k: str(v) for k, v in form.items() if isinstance(v, str)}
    session = await _session(request, ctx)
    if session is None:
        return pages.error_page("Signed out", "sign in again from the application", status=401)
    presented = fields.get("csrf_token", "")
    if not hmac.compare_digest(presented.encode(), consent_token(request).encode()):
        return pages.error_page("Request refused", "the form expired; start again", status=403)
    # every occurrence, as the GET hands them on: a field given twice is refused there
    passed = [(k, v) for k, v in form.items() if k in _PASSED and isinstance(v, str)]
    try:
        auth_request = await parse(ctx, MultiDict([*passed, ("response_type", "code")]))
    except PageError as exc:
        return pages.error_page(exc.title, exc.message)
    if fields.get("decision") != "approve":
        raise redirect_to(
            auth_request.redirect_uri,
            {"error": "access_denied", "state": auth_request.state},
            ctx.settings.issuer,
        )
    user = ctx.directory.users[session.user_id]
    meta = metadata(request, f"user:{user.user_id}")
    code = tokens.new(tokens.CODE)
    try:
        await _record_consent(ctx, auth_request, user, tokens.token_hash(code), meta)
    except consent.AdminApprovalRequired as exc:
        return pages.error_page("An admin must allow this", exc.description, status=403)
    raise redirect_to(
        auth_request.redirect_uri, {"code": code, "state": auth_request.state}, ctx.settings.issuer
    )


async def _record_consent(
    ctx: Context, auth_request: AuthorizationRequest, user: User, code_hash: str, meta: Metadata
) -> None:
    """The grant, then the code; only the code when the connection already holds every
    approved permission and is still as this process saw it (see consent.Consent).

    The grant is the union of the connection and this consent, appended at the version of
    the connection stream that the union was taken from: a consent that committed meanwhile
    (in any process) makes this one decide again on top of it, so neither narrows the
    other. The stream's version is read before the model catches up, so the model holds at
    least what the stream held then."""
    app = auth_request.app
    stream = streams.connection(user.company_id, app.client_id)
    for _ in range(_CONSENT_ATTEMPTS):
        logged = await ctx.eventlog.stream_version(stream)
        await ctx.refresh()
        connection = ctx.lookups.connection(user.company_id, app.client_id)
        if connection is not None and connection.version > logged:
            continue  # granted meanwhile: read the stream again
        if connection is not None and connection.version < logged:
            # The stream moved past what this model holds (a revocation it has not
            # applied): nothing is held any more, as far as this consent can tell.
            connection = None
        given = consent.approve(
            app, user.company_id, user.user_id, auth_request.permissions,
            auth_request.redirect_uri, auth_request.code_challenge, code_hash, connection,
            int(time.time()), role=user.role,
            stream_version=logged, dpop_jkt=auth_request.dpop_jkt,
            redirect_uri_given=auth_request.redirect_uri_given,
        )  # fmt: skip
        try:
            if given.code_alone is not None:
                await ctx.ledger.record(given.code_alone, meta, visible=True)
                return
            await ctx.ledger.record(given.grant, meta, visible=True)
        except ConcurrencyError as exc:
            if exc.stream_id != stream:
                raise
            continue
        await ctx.ledger.record(given.code, meta, visible=True)
        return
    raise Conflict("the connection keeps changing; try again")
