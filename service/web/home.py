"""`GET /`: where a person who opens the service's address lands, and an index for programs."""

from __future__ import annotations

from aiohttp import web

from service.web.pages import page

routes = web.RouteTableDef()

LINKS = {
    "dashboard": "/dashboard",
    "authorization_server_metadata": "/.well-known/oauth-authorization-server",
    "health": "/healthz",
    "readiness": "/readyz",
}

_BODY = """<h1>Tollgate</h1>
<p>An OAuth 2.0 token and policy service.</p>
<ul>
<li><a href="/dashboard">The dashboard</a>: company admins sign in here with their email
and password to manage applications, connections and users.</li>
<li><a href="/.well-known/oauth-authorization-server">The authorization server metadata</a>
(RFC 8414): the endpoints and permissions, for OAuth clients.</li>
<li><a href="/readyz">Readiness</a>: whether the database answers and the projections are
caught up.</li>
</ul>
<p class="muted">New here? Follow &ldquo;A first walk through&rdquo; in the README.md of
Tollgate's source: it creates a company, an application and a token with curl, and signs in
here in a browser.</p>"""


def _quality(accept: str, media_type: str) -> float:
    """How much the Accept header (RFC 9110 §12.5.1) wants `media_type`: the q of the most
    specific range that matches it, 0 when none does. A malformed q counts as 0, so no
    header a client writes can fail the request."""
    kind = media_type.split("/")[0]
    best_specificity, best_q = -1, 0.0
    for item in accept.split(","):
        range_, *params = (part.strip() for part in item.split(";"))
        specificity = {media_type: 2, f"{kind}/*": 1, "*/*": 0}.get(range_.lower(), -1)
        if specificity <= best_specificity:
            continue
        q = 1.0
        for param in params:
            name, _, value = param.partition("=")
            if name.strip().lower() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
                q = min(q, 1.0) if q > 0 else 0.0  # NaN too
        best_specificity, best_q = specificity, q
    return best_q


def wants_html(request: web.Request) -> bool:
    """A browser (which asks for text/html before anything else) gets the page; curl (`*/*`),
    a program asking for JSON, or no Accept header at all, gets JSON: on a tie, the API's
    own format wins."""
    accept = request.headers.get("Accept", "*/*")
    return _quality(accept, "text/html") > _quality(accept, "application/json")


@routes.get("/")
async def home(request: web.Request) -> web.Response:
    """The page a person sees at the service's address, not a 404."""
    if wants_html(request):
        response = page("Tollgate", _BODY)
    else:
        response = web.json_response({"service": "tollgate", "links": LINKS})
    # the answer depends on Accept: a cache must not hand the page to a program
    response.headers["Vary"] = "Accept"
    return response
