"""What every request goes through (its id, its count and its log line) and the one place
errors become responses: `observed` wraps each route's handler."""

from __future__ import annotations

import functools
import os
import secrets
import time
from collections.abc import Iterable

import asyncpg
import structlog
from aiohttp import hdrs, web
from aiohttp.typedefs import Handler
from aiohttp.web_urldispatcher import _default_expect_handler
from multidict import istr

from service import logs
from service.errors import InvalidRequest, TollgateError, Unavailable
from service.eventlog import EventLogRefused, EventLogUnavailable
from service.logs import request_line
from service.metrics import CLIENT_CLOSED_REQUEST, METRICS, UNMATCHED
from service.web.keys import REQUEST_ID, caller_ip, remember_caller_ip

UNAVAILABLE = (
    EventLogUnavailable,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,  # what a query raises when the server ends the connection
    asyncpg.CannotConnectNowError,
    ConnectionError,
    TimeoutError,  # a bound on a wait for the database (service.storage.database)
)

# SQLSTATE classes that say the database cannot do the work now, whatever the request
# holds: 08 connection, 25 transaction state (a read-only database), 40 rollback
# (serialization failure, deadlock), 53 resources (disk full, out of memory, too many
# connections), 55 lock not available (lock_timeout), 57 operator intervention (a statement
# cancelled by statement_timeout, a shutdown), 58 system (I/O). Any other is a bug: a 500.
_UNAVAILABLE_SQLSTATE = frozenset({"08", "25", "40", "53", "55", "57", "58"})

#: seconds a client is asked to wait before retrying a 503
RETRY_AFTER = "2"


def database_unavailable(exc: BaseException) -> bool:
    """Whether `exc` is the database failing to serve, rather than the request's fault or a
    bug: the one mapping from driver errors to a 503, for every route."""
    if isinstance(exc, asyncpg.PostgresError):
        return str(exc.sqlstate or "")[:2] in _UNAVAILABLE_SQLSTATE
    return isinstance(exc, UNAVAILABLE)


log = structlog.get_logger(__name__)

_VALID_ID = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")


class _RequestIds:
    """Random request ids of 16 hex digits, from the system's CSPRNG 512 at a time: a
    system call per request cost more than everything else about the id."""

    _PER_READ = 512

    def __init__(self) -> None:
        self._hex = ""
        self._next = 0
        # A forked child must not hand out the ids its parent still holds.
        os.register_at_fork(after_in_child=self._forget)

    def _forget(self) -> None:
        self._hex, self._next = "", 0

    def __call__(self) -> str:
        start = self._next
        if start >= len(self._hex):
            self._hex, start = secrets.token_hex(8 * self._PER_READ), 0
        self._next = start + 16
        return self._hex[start : start + 16]


_new_request_id = _RequestIds()


_X_REQUEST_ID = istr("X-Request-Id")  # a header name case-folded once, not per request


def _request_id(request: web.Request) -> str:
    given = request.headers.get(_X_REQUEST_ID, "")
    if 0 < len(given) <= 64 and set(given) <= _VALID_ID:
        return given
    return _new_request_id()


def observed(handler: Handler, route: str) -> Handler:
    """`handler` with everything a request goes through on its way to it and back: its
    id, the errors rendered in their protocol's format, the request counted by route and
    final status, and its one log line. `route`: the label it is counted under, the
    canonical path it is routed at (`/admin/applications/{client_id}`) or UNMATCHED.

    Every route's handler is wrapped here when it is added (`observed_routes`, and
    `route_unmatched` for what no route matches), rather than in an application
    middleware: with any middleware, aiohttp runs two more frames per request (its own,
    which keeps `request.app` for sub-applications, and the middleware's), about 4% of the
    gateway's instructions for nothing this service uses.

    The status counted and logged is that of the rendered error (404, 500), not the
    exception. A redirect is raised, and aiohttp turns it into the response afterwards. A
    client that leaves while its body is read is counted as 499 (CLIENT_CLOSED_REQUEST).
    A cancelled request has no status: it is neither counted nor logged."""

    @functools.wraps(handler)
    async def observe(request: web.Request) -> web.StreamResponse:
        started = time.perf_counter()
        app = request.app
        request_id = _request_id(request)
        request[REQUEST_ID] = request_id
        logs.request_id.set(request_id)  # on every event logged while answering it
        ip = remember_caller_ip(request, app)
        try:
            try:
                response = await handler(request)
            except Exception as exc:
                response = _rendered(request, exc)
        except web.HTTPException as exc:  # a redirect
            _finish(request, exc, app, started, request_id, ip, route)
            raise
        _finish(request, response, app, started, request_id, ip, route)
        return response

    return observe


async def expectation(request: web.BaseRequest) -> None:
    """Every route's `Expect` handler (RFC 9110 §10.1.1): 100-continue is met as aiohttp
    meets it (an interim 100 before the body is read); any other expectation is left unmet,
    as the RFC allows, and the request answered. aiohttp's own answered it with a text/plain
    417 before the middlewares: no request id, no log line, no count."""
    if request.headers.get(hdrs.EXPECT, "").lower() == "100-continue":
        await _default_expect_handler(request)  # type: ignore[arg-type]


def observed_routes(table: Iterable[web.AbstractRouteDef]) -> list[web.AbstractRouteDef]:
    """`table`'s routes, as `app.add_routes` takes them, each handler `observed` and each
    expectation answered by `expectation`."""
    out: list[web.AbstractRouteDef] = []
    for definition in table:
        if not isinstance(definition, web.RouteDef):  # a static directory: none is served
            raise TypeError(f"only handlers can be observed, not {definition!r}")
        handler = observed(definition.handler, canonical(definition.path))
        kwargs = {"expect_handler": expectation, **definition.kwargs}
        out.append(web.RouteDef(definition.method, definition.path, handler, kwargs))
    return out


def canonical(path: str) -> str:
    """The path as aiohttp names its resource (`/api/{path:.*}` is `/api/{path}`): the
    label of its requests, never the raw path, which keeps the series bounded."""
    return web.UrlDispatcher().add_resource(path).canonical


#: the catch-all `route_unmatched` adds: not one of the service's routes
UNMATCHED_PATH = r"/{unmatched:[\s\S]*}"  # a decoded path may hold a line break


def route_unmatched(app: web.Application) -> None:
    """What no route matches, answered as aiohttp would (404, or 405 with Allow for a
    path routed for other methods) and observed like any request. Added last: aiohttp
    tries a path's resources in the order they were added."""
    app.router.add_route(
        "*", UNMATCHED_PATH, observed(_unmatched, UNMATCHED), expect_handler=expectation
    )


async def _unmatched(request: web.Request) -> web.StreamResponse:
    allowed: set[str] = set()
    for resource in request.app.router.resources():
        if resource is not request.match_info.route.resource:
            _match, methods = await resource.resolve(request)
            allowed |= methods
    if allowed:
        raise web.HTTPMethodNotAllowed(request.method, allowed)
    raise web.HTTPNotFound()


def _finish(
    request: web.Request,
    response: web.StreamResponse,
    app: web.Application,
    started: float,
    request_id: str,
    ip: str,
    route: str,
) -> None:
    """The request id on the response, the request counted, and its one log line."""
    seconds = time.perf_counter() - started
    response.headers[_X_REQUEST_ID] = request_id
    status = response.status
    recorder = app.get(METRICS)
    if recorder is not None:  # an application without metrics (unit tests) counts nothing
        recorder.observe_request(route, request.method, status, seconds)
    ms = int(seconds * 100_000 + 0.5) / 100  # rounded to 10 us: round(x, 2) costs twice this
    request_line(request.method, request.path, status, ms, ip, request_id)


def client_went_away(request: web.Request, exc: BaseException) -> bool:
    """Whether `exc` is aiohttp telling the handler that the client closed the connection
    while the body was being read: it sets exactly that exception on the request's body
    stream. A ConnectionError from anywhere else (the database's socket) is not this."""
    return isinstance(exc, ConnectionError) and request.content.exception() is exc


def error_response(error: TollgateError) -> web.Response:
    body = {"error": error.error, "error_description": error.description or error.error}
    headers = error.headers
    if error.status == 503 and "Retry-After" not in headers:
        headers = {**headers, "Retry-After": RETRY_AFTER}
    return web.json_response(body, status=error.status, headers=headers)


def _rendered(request: web.Request, exc: Exception) -> web.StreamResponse:
    """The one place an error becomes a response: the service's own errors in their
    protocol's format, aiohttp's (404, 405, 413) as JSON, a database in trouble as a 503,
    anything else as a 500 that says nothing more. A redirect is raised again."""
    if isinstance(exc, TollgateError):
        return error_response(exc)
    if isinstance(exc, web.HTTPException):
        if exc.status < 400:
            raise exc
        code = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}.get(
            exc.status, "invalid_request"
        )
        return web.json_response(
            {"error": code, "error_description": exc.reason},
            status=exc.status,
            headers={k: v for k, v in exc.headers.items() if k.lower() == "allow"},
        )
    if isinstance(exc, EventLogRefused | asyncpg.DataError):
        # A value PostgreSQL cannot store (a NUL in text, say) that no check caught first:
        # the request's fault, and retrying will not help.
        log.warning("http.value_refused", path=request.path, error=type(exc).__name__)
        return error_response(InvalidRequest("the request holds a value that cannot be stored"))
    if not database_unavailable(exc):
        log.exception("http.unhandled_error", method=request.method, path=request.path)
        return web.json_response(
            {"error": "server_error", "error_description": "internal error"}, status=500
        )
    if client_went_away(request, exc):
        # Nobody is left to answer; the status says so in the request line and the
        # metrics (nginx's 499), and a database alert does not fire for a slow client.
        log.info("http.client_disconnected", path=request.path, ip=caller_ip(request))
        return web.Response(status=CLIENT_CLOSED_REQUEST)
    # The database is down or unreachable: a 503 the client may retry, not a 500.
    log.warning("http.database_unavailable", path=request.path, error=type(exc).__name__)
    return error_response(Unavailable("the service cannot use its database now; try again"))
