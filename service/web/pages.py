"""Server-rendered pages for people: login (with its CSRF token), consent, errors. Plain
HTML, no external assets, every value escaped."""

from __future__ import annotations

import hmac
import re
from collections.abc import Mapping, Sequence
from html import escape
from urllib.parse import urlsplit

from aiohttp import web
from yarl import URL

from service.domain import credentials
from service.web.keys import secure_cookies

_STYLE = """
:root { color-scheme: light dark; --accent: #1f5fbf; }
* { box-sizing: border-box; }
body { font: 16px/1.5 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0;
       display: grid; place-items: center; min-height: 100vh;
       background: Canvas; color: CanvasText; }
main { width: min(28rem, 92vw); padding: 2rem; border-radius: 12px;
       border: 1px solid color-mix(in srgb, CanvasText 20%, transparent); }
h1 { font-size: 1.35rem; margin: 0 0 1rem; }
label { display: block; margin: .75rem 0 .25rem; font-weight: 600; }
input[type=email], input[type=password] { width: 100%; padding: .6rem; font: inherit;
       border: 1px solid color-mix(in srgb, CanvasText 35%, transparent); border-radius: 6px; }
button { font: inherit; padding: .6rem 1.2rem; border-radius: 6px; border: 1px solid var(--accent);
       cursor: pointer; margin-top: 1rem; }
button.primary { background: var(--accent); color: white; }
button.secondary { background: transparent; color: inherit; }
button:focus-visible, input:focus-visible { outline: 3px solid var(--accent); outline-offset: 2px; }
ul.permissions { padding-left: 1.2rem; }
ul.permissions li { margin: .35rem 0; }
.permission { font-family: ui-monospace, monospace; font-size: .9em; }
.error { border-left: 4px solid #c0392b; padding: .5rem .75rem;
         background: color-mix(in srgb, #c0392b 10%, transparent); }
.actions { display: flex; gap: .75rem; flex-wrap: wrap; }
.muted { opacity: .75; font-size: .9rem; }
"""

_CSP = (
    "default-src 'none'; style-src 'unsafe-inline'; form-action {form_action}; "
    "frame-ancestors 'none'; base-uri 'none'"
)
_HEADERS = {
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
}
SECURITY_HEADERS = {"Content-Security-Policy": _CSP.format(form_action="'self'"), **_HEADERS}

# CSP3 §2.3.1 host-part without wildcards: ASCII letters, digits and hyphens in labels.
_CSP_HOST = re.compile(r"[a-z0-9-]+(?:\.[a-z0-9-]+)*")


def redirect_source(uri: str) -> str | None:
    """The CSP source expression (CSP3 §2.3.1) that lets a form on a page end in a redirect
    to `uri`: its scheme://host[:port]. Chromium and Safari check form-action against every
    redirect a form submission follows, so a consent page with `form-action 'self'` keeps
    the browser from reaching the application (https://github.com/w3c/webappsec-csp/issues/8).
    CSP ignores the path after a redirect, so the origin is all there is to name.

    Built from the parsed parts, each checked against the grammar, never copied from the
    string: nothing that ends a directive or a source (`;`, `,`, spaces, quotes) gets
    through. A host the grammar cannot express (an IPv6 literal such as `[::1]`, which
    Chromium drops as an invalid source; a name that is not valid IDNA) falls back to the
    scheme alone (`http:`): wider, but it widens only where this page's form may lead, and
    the form's own action is fixed. None for anything that is not an http(s) URL."""
    try:
        parts = urlsplit(uri)
        port = parts.port
    except ValueError:
        return None
    if parts.scheme not in ("https", "http"):
        return None
    try:
        host = ascii_host(parts.hostname or "").lower()
    except (UnicodeError, ValueError):
        host = ""
    if not _CSP_HOST.fullmatch(host):
        return f"{parts.scheme}:"
    return f"{parts.scheme}://{host}" + ("" if port is None else f":{port:d}")


def security_headers(redirect_uri: str | None = None) -> dict[str, str]:
    """The headers of every page. `redirect_uri`: where a form on the page may end up after
    the server's redirect (the application's registered redirect URI), besides 'self'."""
    source = None if redirect_uri is None else redirect_source(redirect_uri)
    if source is None:
        return dict(SECURITY_HEADERS)
    return {"Content-Security-Policy": _CSP.format(form_action=f"'self' {source}"), **_HEADERS}


def page(
    title: str, body: str, *, status: int = 200, redirect_uri: str | None = None
) -> web.Response:
    html = (
        '<!doctype html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{escape(title)} · Tollgate</title>\n<style>{_STYLE}</style>\n</head>\n"
        f"<body>\n<main>\n{body}\n</main>\n</body>\n</html>\n"
    )
    return web.Response(
        text=html,
        status=status,
        content_type="text/html",
        headers=security_headers(redirect_uri),
    )


def _hidden(fields: Mapping[str, str]) -> str:
    return "\n".join(
        f'<input type="hidden" name="{escape(k)}" value="{escape(v)}">' for k, v in fields.items()
    )


def error_page(title: str, message: str, *, status: int = 400) -> web.Response:
    return page(
        title,
        f'<h1>{escape(title)}</h1>\n<p class="error" role="alert">{escape(message)}</p>\n'
        '<p class="muted">You can close this page. If you followed a link from an '
        "application, tell its makers what happened.</p>",
        status=status,
    )


def signed_in_refused_page(
    title: str,
    message: str,
    *,
    email: str,
    csrf_token: str,
    status: int = 403,
    own: tuple[str, str] | None = None,
) -> web.Response:
    """A page a signed-in person may not see, with the way out: signing out (another
    account may be the one that can), with the session's CSRF token; `own`: the label and
    path of a page that is theirs."""
    link = f'<p><a href="{escape(own[1])}">{escape(own[0])}</a></p>\n' if own else ""
    return page(
        title,
        f'<h1>{escape(title)}</h1>\n<p class="error" role="alert">{escape(message)}</p>\n'
        f'<p class="muted">Signed in as {escape(email)}.</p>\n{link}'
        f'<form method="post" action="/dashboard/logout">\n'
        f"{_hidden({'csrf_token': csrf_token})}\n"
        '<div class="actions"><button class="primary" type="submit">Sign out</button></div>\n'
        "</form>",
        status=status,
    )


def login_page(
    *,
    action: str,
    fields: Mapping[str, str],
    message: str | None = None,
    status: int = 200,
    redirect_uri: str | None = None,
) -> web.Response:
    alert = f'<p class="error" role="alert">{escape(message)}</p>\n' if message else ""
    return page(
        "Sign in",
        f"<h1>Sign in</h1>\n{alert}"
        f'<form method="post" action="{escape(action)}">\n{_hidden(fields)}\n'
        '<label for="email">Email</label>\n'
        '<input id="email" name="email" type="email" autocomplete="username" required autofocus>\n'
        '<label for="password">Password</label>\n'
        '<input id="password" name="password" type="password" '
        'autocomplete="current-password" required>\n'
        '<div class="actions"><button class="primary" type="submit">Sign in</button></div>\n'
        "</form>",
        status=status,
        redirect_uri=redirect_uri,
    )


# --- login CSRF: a double-submit token, in a cookie and in the form -------------------

_LOGIN_CSRF_BYTES = 24
# What credentials.random_token(24) gives: 24 bytes in base64url without padding.
_LOGIN_CSRF_SHAPE = re.compile(r"[A-Za-z0-9_-]{32}")


def login_csrf_cookie(request: web.Request, name: str) -> str | None:
    """The login-CSRF cookie, only if it has the shape this service issues. Anything else
    (bytes that are not UTF-8, a forged or truncated value) counts as no cookie: it is
    never echoed into a page or encoded for a comparison, where it could raise."""
    value = request.cookies.get(name, "")
    return value if _LOGIN_CSRF_SHAPE.fullmatch(value) else None


def login_csrf_token(request: web.Request, name: str) -> str:
    """The token for a sign-in form: the browser's own cookie if well formed, else new."""
    return login_csrf_cookie(request, name) or credentials.random_token(_LOGIN_CSRF_BYTES)


def sign_in_form(
    request: web.Request,
    *,
    cookie: str,
    path: str,
    action: str,
    fields: Mapping[str, str],
    message: str | None = None,
    status: int = 200,
    redirect_uri: str | None = None,
) -> web.Response:
    """The sign-in page with its login-CSRF token, in the form and in a cookie scoped to
    `path` (a double submit). `redirect_uri`: where the sign-in may end up, as on `page`."""
    token = login_csrf_token(request, cookie)
    response = login_page(
        action=action, fields={**fields, "csrf_token": token}, message=message, status=status,
        redirect_uri=redirect_uri,
    )  # fmt: skip
    response.set_cookie(
        cookie, token, httponly=True, samesite="Lax", secure=secure_cookies(request),
        path=path, max_age=3600,
    )  # fmt: skip
    return response


def login_csrf_ok(request: web.Request, name: str, presented: str) -> bool:
    """The form's token matches a well-formed cookie."""
    expected = login_csrf_cookie(request, name)
    # surrogatepass: a form field holding lone surrogates must compare unequal, not raise.
    given = presented.encode("utf-8", "surrogatepass")
    return expected is not None and hmac.compare_digest(given, expected.encode())


def _host_of(uri: str) -> str:
    """Where the browser goes after the answer: the redirect URI's host (and port). A name
    in other scripts also as the browser resolves it, in ASCII: apple.com written with a
    Cyrillic a (U+0430) shows as itself and `(xn--pple-43d.com)`, not as apple.com."""
    try:
        parts = urlsplit(uri)
        host, name, port = parts.netloc or uri, parts.hostname or "", parts.port
    except ValueError:
        return uri.encode("ascii", "backslashreplace").decode("ascii")
    if host.isascii():
        return host
    try:
        written = ascii_host(name) + ("" if port is None else f":{port:d}")
    except (UnicodeError, ValueError):  # no name IDNA can write: non-ASCII escaped
        return host.encode("ascii", "backslashreplace").decode("ascii")
    return f"{host} ({written})"


def ascii_host(name: str) -> str:
    """A host name as the answer's Location writes it (yarl: IDNA 2008 with UTS 46,
    non-transitional, as browsers resolve it): faß.de is xn--fa-hia.de, a name of its own,
    where IDNA 2003 (Python's "idna" codec) says fass.de."""
    return URL.build(scheme="https", host=name).raw_host or ""


def consent_page(
    *,
    application: str,
    company: str,
    publisher: str | None,
    user_email: str,
    permissions: Sequence[tuple[str, str]],
    fields: Mapping[str, str],
    redirect_uri: str,
    is_admin: bool,
    admin_only: Sequence[str] = (),
    switch_user: Mapping[str, str] | None = None,
) -> web.Response:
    """Allow or Deny: either answer is a redirect to the application's `redirect_uri`,
    which the page's CSP form-action must let the browser follow.

    Says who publishes the application (`publisher`: its company's name; None when it is
    the user's own company) and where the answer goes, so that another company's look-alike
    of a known application does not get the same page. `admin_only`: permissions this
    member may not approve (no Allow button then). `switch_user`: the "Not you?" form's
    fields (it signs out and comes back to this request)."""
    app, home = escape(application), escape(company)
    items = "\n".join(
        f'<li><span class="permission">{escape(name)}</span>: {escape(text)}</li>'
        for name, text in permissions
    )
    published = (
        f"Published by your company, {home}."
        if publisher is None
        else f'<strong class="error">Published by {escape(publisher)}</strong>, another '
        f"company: not by {home}. Allow it only if you expected an application of theirs."
    )
    blocked = ""
    allow = '<button class="primary" type="submit" name="decision" value="approve">Allow</button>'
    if admin_only:
        names = ", ".join(escape(p) for p in admin_only)
        blocked = (f'<p class="error" role="alert">Only an admin of {home} can allow {names}. '
                   f"Ask an admin to connect {app} first.</p>\n")  # fmt: skip
        allow = ""
    revoke = (
        "You can revoke this connection at any time on the Connections page of the "
        '<a href="/dashboard">dashboard</a>.'
        if is_admin
        else f"An admin of {home} can revoke this connection at any time on the "
        '<a href="/dashboard">dashboard</a>.'
    )
    switch = ""
    if switch_user is not None:
        switch = (f'<form method="post" action="/oauth/switch-user">\n{_hidden(switch_user)}\n'
                  '<button class="secondary" type="submit">Not you? Sign in as someone else'
                  "</button>\n</form>\n")  # fmt: skip
    return page(
        f"Allow {application}",
        f"<h1>Allow <strong>{app}</strong> to access {home}?</h1>\n"
        f'<p class="publisher">{published}</p>\n'
        f"<p>{app} asks for these permissions:</p>\n"
        f'<ul class="permissions">\n{items}\n</ul>\n'
        f"<p>Your answer takes you to <strong>{escape(_host_of(redirect_uri))}</strong>.</p>\n"
        f"{blocked}"
        f'<p class="muted">Signed in as {escape(user_email)}. {revoke}</p>\n'
        f'<form method="post" action="/oauth/authorize">\n{_hidden(fields)}\n'
        f'<div class="actions">{allow}'
        '<button class="secondary" type="submit" name="decision" value="deny">Deny</button>'
        f"</div>\n</form>\n{switch}",
        redirect_uri=redirect_uri,
    )
