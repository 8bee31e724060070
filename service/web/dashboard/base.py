"""What every dashboard page shares: the signed-in admin, the session's CSRF token, the
templates, the notice shown once, and HTML answers for errors."""

from __future__ import annotations

import base64
import functools
import hashlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC
from importlib import resources
from typing import Any

import jinja2
from aiohttp import web
from markupsafe import Markup
from multidict import MultiDict, MultiDictProxy

from service.context import Context
from service.errors import TollgateError
from service.eventlog import Metadata
from service.web import pages, sessions
from service.web.auth import signed_in
from service.web.bodies import form_body
from service.web.dashboard import once
from service.web.keys import CONTEXT, metadata, secure_cookies
from service.web.login import set_session_cookie

routes = web.RouteTableDef()

LOGIN_CSRF_COOKIE = "tg_dashboard_csrf"
#: The session's CSRF token, for the forms: the sessions table keeps only its digest.
#: where the dashboard kept its CSRF token before tokens were derived from the session
#: cookie: cleared at sign-in and sign-out
TOKEN_COOKIE = "tg_dashboard_token"  # noqa: S105 (a cookie name)
#: the signed-in user's own password: the one page a member has here
PASSWORD_PAGE = "/dashboard/password"  # noqa: S105 (a path)


@dataclass(frozen=True)
class Templates:
    """The Jinja2 environment (autoescaping every value) and the copy button's script,
    with the CSP hash that lets exactly that script run."""

    environment: jinja2.Environment
    copy_script: Markup
    copy_script_hash: str


TEMPLATES = web.AppKey("dashboard_templates", Templates)


def templates() -> Templates:
    """Built once, in create_app: the templates ship as package data."""
    environment = jinja2.Environment(
        loader=jinja2.PackageLoader("service.web", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    environment.filters["isotime"] = lambda at: at.astimezone(UTC).isoformat()
    environment.filters["utctime"] = lambda at: f"{at.astimezone(UTC):%Y-%m-%d %H:%M:%S} UTC"
    script = (resources.files("service.web") / "templates" / "dashboard" / "copy.js").read_text()
    digest = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
    # Markup: the script is this package's own file, never a value from a request.
    return Templates(environment, Markup(script), f"'sha256-{digest}'")  # noqa: S704


@dataclass
class Admin:
    """The signed-in company admin, with what the page needs of the session."""

    user_id: str
    email: str
    company_id: str
    company: str
    session_value: str
    csrf: str
    role: str = "admin"  # a member reaches only the pages of their own account
    # Set on the response: a renewed session (see `_known_token`).
    cookies: list[tuple[str, str, str]] = field(default_factory=list)

    def meta(self, request: web.Request) -> Metadata:
        return metadata(request, f"user:{self.user_id}")


class Refused(Exception):
    """The answer instead of the page: the sign-in form, or a 403 page."""

    def __init__(self, response: web.Response) -> None:
        super().__init__(response.status)
        self.response = response


def login_form(request: web.Request, message: str | None = None, status: int = 200) -> web.Response:
    return pages.sign_in_form(
        request, cookie=LOGIN_CSRF_COOKIE, path="/dashboard", action="/dashboard/login",
        fields={}, message=message, status=status,
    )  # fmt: skip


async def signed_in_admin(
    request: web.Request, form: Form | None, *, anyone: bool = False
) -> Admin:
    """The admin of a live session (`anyone`: or a member, for their own account's
    pages). `form`: a change, whose `csrf_token` must be the session's own token, or
    nothing happens (403)."""
    ctx = request.app[CONTEXT]
    found = await signed_in(request, ctx)
    if found is None:
        if form is not None:
            raise Refused(error("Signed out", "Your session has ended. Sign in again.", 403))
        raise Refused(login_form(request))
    session, user = found
    value = request.cookies[sessions.COOKIE]
    company = ctx.directory.companies.get(user.company_id)
    who = Admin(
        user.user_id,
        user.email,
        user.company_id,
        company.name if company else "",
        value,
        "",
        user.role,
    )
    if user.role != "admin" and not anyone:
        # A member signed in here: told why, and given the way out (the admin may share
        # the browser), which needs the session's token like every sign-out, and the one
        # page that is theirs.
        await _known_token(request, ctx, who, session)
        refused = pages.signed_in_refused_page(
            "Admins only", "Only company admins can see the dashboard.",
            email=user.email, csrf_token=who.csrf, own=("Change your password", PASSWORD_PAGE),
        )  # fmt: skip
        _apply_cookies(request, who, refused)
        raise Refused(refused)
    if form is not None and not _token_ok(session, form.get("csrf_token")):
        raise Refused(error("Form expired", "The form expired. Open the page again.", 403))
    await _known_token(request, ctx, who, session)
    return who


def _token_ok(session: sessions.Session, token: str) -> bool:
    # Only what the service issues is hashed: a stray lone surrogate must not raise.
    return token.isascii() and 0 < len(token) <= 100 and session.csrf_ok(token)


async def _known_token(
    request: web.Request, ctx: Context, admin: Admin, session: sessions.Session
) -> None:
    """The session's CSRF token, derived from its cookie (`sessions.csrf_of`). A session
    opened before tokens were derived has a random one, which its digest cannot give back:
    the dashboard swaps it for a new session once."""
    token = sessions.csrf_of(admin.session_value)
    if session.csrf_ok(token):
        admin.csrf = token
        return
    value, token = await sessions.create(
        ctx.pool, admin.user_id, admin.company_id, user_version=session.user_version,
        replacing=admin.session_value,
    )  # fmt: skip
    admin.session_value, admin.csrf = value, token
    admin.cookies.append((sessions.COOKIE, value, "/"))


def _apply_cookies(request: web.Request, admin: Admin, response: web.StreamResponse) -> None:
    for _name, value, _path in admin.cookies:
        set_session_cookie(request, response, value)


# --- answers ---------------------------------------------------------------------------


def error(title: str, message: str, status: int) -> web.Response:
    return pages.error_page(title, message, status=status)


def see_other(
    request: web.Request, admin: Admin, location: str, notice: once.Notice | None = None
) -> web.Response:
    """Back to a page after a change (303), with what it should say this once."""
    response = web.Response(status=303, headers={"Location": location, "Cache-Control": "no-store"})
    if notice is not None:
        response.set_cookie(
            once.COOKIE, once.seal(admin.session_value, notice), httponly=True,
            samesite="Strict", secure=secure_cookies(request), path=once.PATH,
            max_age=once.MAX_AGE,
        )  # fmt: skip
    return response


def render(
    request: web.Request,
    admin: Admin,
    template: str,
    *,
    title: str,
    section: str,
    status: int = 200,
    **values: Any,
) -> web.Response:
    """The page, with the notice sealed for this session (then gone: a reload does not
    show it again)."""
    found = request.app[TEMPLATES]
    sealed = request.cookies.get(once.COOKIE)
    notice = once.unseal(admin.session_value, sealed) if sealed else None
    html = found.environment.get_template(template).render(
        title=title, section=section, admin=admin, notice=notice,
        copy_script=found.copy_script, **values,
    )  # fmt: skip
    headers = pages.security_headers()
    if notice is not None and notice.secret:
        # The copy button's script, and nothing else, may run on this page.
        headers["Content-Security-Policy"] += f"; script-src {found.copy_script_hash}"
    response = web.Response(text=html, status=status, content_type="text/html", headers=headers)
    if sealed is not None:
        response.del_cookie(once.COOKIE, path=once.PATH)
    return response


#: the dashboard's fields that may come more than once: a list of checkboxes
REPEATABLE = frozenset({"permissions"})


class Form:
    """A form's text fields (a file part is ignored: no form here has one)."""

    def __init__(self, body: MultiDictProxy[str | bytes | bytearray | web.FileField]) -> None:
        self._fields = MultiDict((k, v) for k, v in body.items() if isinstance(v, str))

    def get(self, name: str) -> str:
        return self._fields.get(name, "")

    def all(self, name: str) -> list[str]:
        return self._fields.getall(name, [])

    def lines(self, name: str) -> list[str]:
        """A textarea of one value a line (or separated by commas), blanks dropped."""
        text = self.get(name).replace(",", "\n")
        return [line.strip() for line in text.splitlines() if line.strip()]


View = Callable[[web.Request, Admin], Awaitable[web.Response]]
Change = Callable[[web.Request, Admin, Form], Awaitable[web.Response]]
Handler = Callable[[web.Request], Awaitable[web.Response]]


def page(handler: View, *, anyone: bool = False) -> Handler:
    """A GET page for admins (`anyone`: for any signed-in user, their own account's):
    others get the sign-in form or a 403 page."""

    @functools.wraps(handler)
    async def guarded(request: web.Request) -> web.Response:
        async def run() -> tuple[Admin, web.Response]:
            admin = await signed_in_admin(request, None, anyone=anyone)
            return admin, await handler(request, admin)

        return await _answer(request, run)

    return guarded


def change(handler: Change, *, anyone: bool = False) -> Handler:
    """A form POST for admins (`anyone`: as `page`), checked against the session's CSRF
    token before anything."""

    @functools.wraps(handler)
    async def guarded(request: web.Request) -> web.Response:
        async def run() -> tuple[Admin, web.Response]:
            form = await read_form(request)
            admin = await signed_in_admin(request, form, anyone=anyone)
            return admin, await handler(request, admin, form)

        return await _answer(request, run)

    return guarded


_TITLES = {400: "Not possible", 404: "Not found", 409: "Conflict", 412: "Changed meanwhile"}


async def _answer(
    request: web.Request, run: Callable[[], Awaitable[tuple[Admin, web.Response]]]
) -> web.Response:
    try:
        admin, response = await run()
    except Refused as refused:
        return refused.response
    except TollgateError as exc:
        if exc.status >= 500 or exc.status in (413, 415):
            raise  # the request observer renders these, as everywhere
        # Another company's application (404), a user who exists already (409), ...
        return error(_TITLES.get(exc.status, "Not possible"), exc.description, exc.status)
    _apply_cookies(request, admin, response)
    return response


async def read_form(request: web.Request) -> Form:
    return Form(await form_body(request, repeatable=REPEATABLE))
