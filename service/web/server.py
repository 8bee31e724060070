"""The HTTP server around the application: aiohttp's runner, with a request handler whose
answer to a request the HTTP parser refused never quotes that request back, and which
bounds what slow or numerous clients can hold (see `Limits`)."""

from __future__ import annotations

import asyncio
import gc
import ipaddress
import os
import re
import resource
import signal
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import urlsplit

import msgspec
import structlog
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestHandler, RequestPayloadError
from yarl import URL

from service.metrics import METRICS
from service.settings import Settings

log = structlog.get_logger(__name__)

T = TypeVar("T")

# What aiohttp's own handler does: answers keep-alive connections for 75 s, and gives
# requests in flight a minute to finish on shutdown.
KEEPALIVE_TIMEOUT = 75.0
SHUTDOWN_TIMEOUT = 60.0

# The parser's message is a fixed phrase, then a colon and the offending bytes
# ("Invalid header value char:\n\n  b'Authorization: Bearer …'"). Only a phrase of plain
# words is kept, so nothing the client sent can come back.
_PLAIN_PHRASE = re.compile(r"[A-Za-z0-9 ,.\-]{1,80}")


def parser_reason(exc: BaseException | None) -> str | None:
    if not isinstance(exc, HttpProcessingError):
        return None
    phrase = exc.message.split(":", 1)[0].split("\n", 1)[0].strip()
    return phrase if _PLAIN_PHRASE.fullmatch(phrase) else None


@dataclass
class Limits:
    """What one process lets clients hold. aiohttp never times out a request that is
    still arriving: a client sending a byte every few seconds held its connection (and a
    descriptor, and memory) for as long as it liked, and enough of them exhausted the
    process. Each request's headers and body must now arrive within `body_timeout`
    seconds (from the connection opening, or from the request's first byte), and at most
    `max_connections` are open at once. At the bound, a new connection takes the place of
    the oldest one idle between keep-alive requests (closed, as keep-alive allows at any
    time, RFC 9112 §9.3): idle connections cannot keep clients out. With none idle, one
    more is answered 503 and closed unread."""

    body_timeout: float
    max_connections: int
    open: int = 0
    refused: int = field(default=0, repr=False)  # since the last log line about it
    logged_at: float = field(default=0.0, repr=False)
    #: the connections with a request on its way, and when its first byte came: swept a
    #: few times per bound by one timer, rather than a timer set and cancelled per request
    arriving: dict[_RequestHandler, float] = field(default_factory=dict, repr=False)
    sweeping: bool = field(default=False, repr=False)
    #: every connection counted in `open`, oldest first
    counted: dict[_RequestHandler, None] = field(default_factory=dict, repr=False)
    #: told of each request or connection answered here, before any route, by reason
    #: (`Metrics.http_rejected`; the Runner sets it from its application's metrics)
    rejected: Callable[[str], None] = field(default=lambda _reason: None, repr=False)

    def make_room(self) -> bool:
        """Close the oldest idle connection, if any, and count it gone at once."""
        for handler in self.counted:
            if handler.idle:
                handler.evict()
                return True
        return False

    def arrives(self, handler: _RequestHandler, loop: asyncio.AbstractEventLoop) -> None:
        self.arriving[handler] = loop.time()
        if not self.sweeping:
            self.sweeping = True
            loop.call_later(self._sweep_every, self._sweep, loop)

    @property
    def _sweep_every(self) -> float:
        return min(1.0, self.body_timeout / 4)

    def _sweep(self, loop: asyncio.AbstractEventLoop) -> None:
        """Time out each request that has been arriving for `body_timeout` (within a
        quarter of it, or a second, after)."""
        now = loop.time()
        late = [h for h, since in self.arriving.items() if now - since >= self.body_timeout]
        for handler in late:
            del self.arriving[handler]
            handler.timed_out()
        if self.arriving:
            loop.call_later(self._sweep_every, self._sweep, loop)
        else:
            self.sweeping = False

    def refuse(self, peer: str | None) -> None:
        self.rejected("too_many_connections")
        self.refused += 1
        now = time.monotonic()
        if now - self.logged_at >= 1.0:  # one line a second at most, in a flood
            log.warning(
                "http.connection_refused",
                peer=peer,
                open=self.open,
                max_connections=self.max_connections,
                refused=self.refused,
            )
            self.refused, self.logged_at = 0, now


_REFUSED = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
    b"Retry-After: 2\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s"
)
_TIMED_OUT = (
    b"HTTP/1.1 408 Request Timeout\r\nContent-Type: application/json\r\n"
    b"Connection: close\r\nContent-Length: %d\r\n\r\n%s"
)


_LINGER = 0.5  # seconds a timed-out client has to read its 408 before the socket goes


def _raw(template: bytes, error: str, description: str) -> bytes:
    body = msgspec.json.encode({"error": error, "error_description": description})
    return template % (len(body), body)


class _RequestHandler(RequestHandler):
    """aiohttp's handler, but for the answer and the log line of a request that never
    reached the application: aiohttp answers the parser's message, which quotes the
    request (an Authorization header, a query string), and logs a multi-line traceback.
    It also enforces `Limits` on its connection."""

    def __init__(self, manager: web.Server, limits: Limits | None, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._limits = limits
        self._counted = False
        self._lost: asyncio.Future[None] | None = None

    def lost(self) -> asyncio.Future[None]:
        """Done once the client's connection is gone: aiohttp does not cancel a handler
        whose client has left (handler_cancellation is off), and one waiting on something
        else (the gateway, on its upstream) may want to stop."""
        if self._lost is None:
            self._lost = self._loop.create_future()
            if self.transport is None:
                self._lost.set_result(None)
        return self._lost

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        limits = self._limits
        if limits is None:
            return
        if limits.open >= limits.max_connections and not limits.make_room():
            limits.refuse(self.peer)
            description = "too many connections; try again"
            self._close_with(_raw(_REFUSED, "temporarily_unavailable", description))
            return
        limits.open += 1
        limits.counted[self] = None
        self._counted = True
        self._arm()  # a connection that never completes a request is not kept either

    def connection_lost(self, exc: BaseException | None) -> None:
        self._disarm()
        self._uncount()
        if self._lost is not None and not self._lost.done():
            self._lost.set_result(None)
        super().connection_lost(exc)

    def _uncount(self) -> None:
        if self._counted and self._limits is not None:
            self._limits.open -= 1
            self._limits.counted.pop(self, None)
            self._counted = False

    @property
    def idle(self) -> bool:
        """Between keep-alive requests: aiohttp waits for the next one (its own test: a
        request read but not yet handed to its handler is not idle), nothing arrives, and
        the last answer has left (a client that stops reading leaves it in the buffer:
        that connection is not free to close, and stays counted)."""
        transport = self.transport
        return (
            self._waiter is not None
            and not self._waiter.done()
            and self._limits is not None
            and self not in self._limits.arriving
            and transport is not None
            and transport.get_write_buffer_size() == 0
        )

    def evict(self) -> None:
        """Closed to make room (`Limits.make_room`): nothing is left to send on an idle
        connection, so its socket goes at once; uncounted now."""
        self._uncount()
        self.force_close()

    def data_received(self, data: bytes) -> None:
        limits = self._limits
        if limits is not None and data and self not in limits.arriving:
            limits.arrives(self, self._loop)  # the first byte of a request
        before = self._request_count
        super().data_received(data)
        if self._request_count > before and self._messages:
            # The headers are in; the body is complete at once (none) or later.
            self._messages[-1][1].on_eof(self._disarm)

    @property
    def peer(self) -> str | None:
        peername = self.peername
        return str(peername[0]) if isinstance(peername, tuple) else None

    def _arm(self) -> None:
        assert self._limits is not None
        self._limits.arrives(self, self._loop)

    def _disarm(self) -> None:
        if self._limits is not None:
            self._limits.arriving.pop(self, None)

    def timed_out(self) -> None:
        assert self._limits is not None
        request = self._current_request
        log.info("http.request_timeout", peer=self.peer, seconds=self._limits.body_timeout)
        if request is not None and request.writer.output_size > 0:
            self.force_close()  # a response is under way: nothing else can be said
            return
        self._limits.rejected("timeout")
        description = f"the request did not arrive within {self._limits.body_timeout:g} s"
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        # Closing a socket whose client is still sending resets it, and a reset can destroy
        # the answer before the client reads it: the answer goes out with a FIN, what still
        # arrives is read and dropped (as after force_close), and the socket goes shortly.
        transport.write(_raw(_TIMED_OUT, "invalid_request", description))
        if transport.can_write_eof():
            transport.write_eof()
        self._force_close = True
        if self._waiter is not None:
            self._waiter.cancel()
        self._loop.call_later(_LINGER, transport.abort)

    def log_exception(self, *args: Any, **kwargs: Any) -> None:
        """aiohttp's own error log line with its traceback, but for a body that cannot be
        read (one that does not decompress, chunks out of shape): aiohttp meets it again
        while it drains what the handler left unread, after the handler answered 400. The
        client's doing, not the service's: one info line, the reason's kind alone."""
        exc = kwargs.get("exc_info")
        if isinstance(exc, RequestPayloadError):
            log.info("http.unreadable_body", peer=self.peer, error=type(exc.__cause__).__name__)
            return
        super().log_exception(*args, **kwargs)

    def _close_with(self, answer: bytes) -> None:
        """Say `answer` and close (to a client that has not sent anything yet)."""
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.write(answer)
        self.force_close()

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if request.writer.output_size > 0:
            # as aiohttp does: part of a response is out, another cannot follow
            raise ConnectionError("response already started; cannot send an error")
        if 400 <= status < 500:
            if self._limits is not None:
                self._limits.rejected("malformed")
            reason = parser_reason(exc)
            log.info(
                "http.malformed_request",
                peer=request.remote,
                status=status,
                error=type(exc).__name__ if exc else None,
                reason=reason,
            )
            description = "malformed HTTP request" + (f": {reason}" if reason else "")
            body = {"error": "invalid_request", "error_description": description}
        else:
            # Only what escapes the request observer lands here (a bug): the log has it.
            log.error("http.unhandled_error", peer=request.remote, status=status, exc_info=exc)
            body = {"error": "server_error", "error_description": "internal error"}
        response = web.json_response(body, status=status)
        response.force_close()
        return response


#: what the gateway asks of a connection: whether its client is gone (`lost`)
ConnectionWatch = _RequestHandler


class _Server(web.Server):
    limits: Limits | None = None

    def __call__(self) -> RequestHandler:
        return _RequestHandler(self, self.limits, loop=self._loop, **self._kwargs)


class Runner(web.AppRunner):
    """`web.AppRunner` whose connections are handled by `_RequestHandler`."""

    def __init__(self, app: web.Application, *, limits: Limits | None = None, **kwargs: Any):
        super().__init__(app, **kwargs)
        self._limits = limits
        if limits is not None and METRICS in app:
            limits.rejected = app[METRICS].http_rejected

    async def _make_server(self) -> web.Server:
        made = await super()._make_server()  # starts the application
        handle = made.request_handler

        async def application(request: web.BaseRequest) -> web.StreamResponse:
            return await handle(_as_routed(request))

        server = _Server(
            application,
            request_factory=made.request_factory,
            handler_cancellation=made.handler_cancellation,
            loop=asyncio.get_running_loop(),
            **made._kwargs,
        )
        server.limits = self._limits
        return server


def _as_routed(request: web.BaseRequest) -> web.BaseRequest:
    """A target that is no path (`OPTIONS *`, `CONNECT host:port`) routed as one that
    matches nothing: aiohttp answered it before the application's middlewares, a text/plain
    404 with no request id, no log line and no count; the application answers it as any
    path it does not know (a JSON 404, logged). An absolute-form target
    (`GET http://host/path`, RFC 9112 §3.2.2) is a path already."""
    path = request.rel_url.path
    if path.startswith("/"):
        return request
    return request.clone(rel_url=URL.build(path="/" + request.raw_path.lstrip("/")))


def limits(settings: Settings) -> Limits:
    """The settings' limits, within the descriptors this process may open: the soft limit
    is raised to the hard one, and connections are capped below it, leaving room for the
    database pool, the log and the files the service opens (else accept() fails with
    EMFILE and the process stops answering everyone, /healthz included)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        wanted = hard if hard != resource.RLIM_INFINITY else max(soft, 65536)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            soft = wanted
        except (ValueError, OSError):
            pass
    room = soft - settings.pool_size - 100
    cap = max(1, min(settings.max_connections, room))
    if cap < settings.max_connections:
        log.warning(
            "http.max_connections_lowered",
            max_connections=settings.max_connections,
            to=cap,
            open_files_limit=soft,
        )
    return Limits(body_timeout=settings.body_timeout, max_connections=cap)


def listen_url(settings: Settings) -> str:
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    return f"http://{host}:{settings.port}"


def issuer_guessed(settings: Settings) -> None:
    """Without PUBLIC_URL the issuer is the listening address (`Settings.issuer`): right for
    a loopback service, wrong for one that others reach (0.0.0.0 publishes "localhost"), whose
    clients read the issuer and every endpoint from the metadata (RFC 8414) and check `iss`
    (RFC 9207). Said once at start, as a warning; so is an issuer with a path, which works
    only behind a proxy set up for it."""
    if settings.public_url:
        path = urlsplit(settings.public_url).path
        if path.strip("/"):
            log.warning(
                "service.issuer_has_path", issuer=settings.issuer,
                detail=f"the proxy in front must strip {path} from the requests under it "
                f"and pass /.well-known/oauth-authorization-server{path} as it is (RFC 8414 "
                "§3.1); the sign-in, consent and dashboard pages link from the host's root, "
                "so authorization_code needs them reached there too. A host name of "
                "Tollgate's own needs none of this",
            )  # fmt: skip
        return
    try:
        loopback = ipaddress.ip_address(settings.host).is_loopback
    except ValueError:
        loopback = settings.host == "localhost"
    if not loopback:
        log.warning(
            "service.issuer_from_listen_address", issuer=settings.issuer, host=settings.host,
            detail="set PUBLIC_URL to the address clients use: the metadata, iss and the "
            "DPoP htu are built from the issuer",
        )  # fmt: skip


def dashboard_url(settings: Settings) -> str:
    # The issuer is where browsers reach the service (PUBLIC_URL, or localhost for 0.0.0.0).
    return f"{settings.issuer.rstrip('/')}/dashboard"


def event_loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's event loop where it is installed (a dependency; it has no Windows build):
    the same aiohttp and asyncpg code, with sockets, timers and callbacks in C, answers
    more requests per core. None: asyncio's own loop."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


#: How many container objects may be allocated (net of those freed) before CPython's cyclic
#: garbage collector looks at the young ones; its default is 700. Under load the requests
#: in flight hold more than that, so at 700 the collector ran once every 25 to 40 tokens
#: issued and re-examined them each time: 9% of the service's CPU, and tens of
#: milliseconds of p99, under `make bench`'s issuance load. Refcounting frees nearly
#: everything a request makes; the collector is only for cycles, which this bound still
#: reclaims.
GC_THRESHOLD = (10_000, 10, 10)


def settle_heap() -> None:
    """Once the service has started, what exists (modules, the in-memory models as caught
    up, pools) lives as long as the process: `gc.freeze` moves it out of the collector's
    reach, so a full collection looks only at what came after (a full collection of a
    started service walked about 80,000 objects, 25 ms each time)."""
    gc.collect()
    gc.freeze()


def run_as_served(main: Coroutine[Any, Any, T]) -> T:
    """`main` to completion in this process as the service runs: on its event loop
    (`event_loop_factory`) and with its collector threshold (`GC_THRESHOLD`). Once `main`
    has stopped on a signal (`stopping_on`), the stop signals are ignored for the moments
    the interpreter takes to exit: closing the loop gave them back their defaults, and a
    second SIGTERM there ended a process that had stopped cleanly with -15."""
    gc.set_threshold(*GC_THRESHOLD)
    try:
        with asyncio.Runner(loop_factory=event_loop_factory()) as runner:
            return runner.run(main)
    finally:
        if _STOPPED_ON:
            for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                signal.signal(signum, signal.SIG_IGN)


#: the stop signal this process received, if any (`stopping_on`)
_STOPPED_ON: list[str] = []


def stopping_on(signum: int) -> str:
    """Records that this process is stopping on `signum` (see `run_as_served`); its name."""
    name = signal.Signals(signum).name
    _STOPPED_ON.append(name)
    return name


def serve(app: web.Application, settings: Settings, *, reuse_port: bool = False) -> None:
    """Serve until SIGTERM, SIGINT or SIGHUP, then let requests in flight finish and clean
    up."""
    try:
        run_as_served(_serve(app, settings, reuse_port))
    except KeyboardInterrupt:  # Ctrl-C while starting, before the handlers are in place
        log.info("service.stopping", signal="SIGINT")


async def _serve(app: web.Application, settings: Settings, reuse_port: bool) -> None:
    runner = Runner(
        app,
        limits=limits(settings),
        access_log=None,  # the request observer writes the one line per request
        keepalive_timeout=KEEPALIVE_TIMEOUT,
        shutdown_timeout=SHUTDOWN_TIMEOUT,
    )
    try:
        # Within the try: stopped while it starts (the models catching up, say), what has
        # started is cleaned up, the embedded PostgreSQL among it.
        await runner.setup()
        settle_heap()
        site = web.TCPSite(runner, settings.host, settings.port, reuse_port=reuse_port or None)
        await site.start()
        stop = asyncio.Event()
        received: list[str] = []
        loop = asyncio.get_running_loop()
        # SIGHUP too (a closed terminal, or an operator used to "reload"): Python's default
        # ended the process at once, requests in flight with it
        for signum in stop_signals():
            loop.add_signal_handler(signum, _on_signal, stop, received, signum)
        unblock_stop_signals()
        _started(settings, worker=reuse_port)
        await stop.wait()
        log.info("service.stopping", signal=received[0])
    finally:
        await runner.cleanup()


def stop_signals() -> tuple[signal.Signals, ...]:
    """The signals that stop a process of the service as Ctrl-C does: SIGTERM, SIGINT and
    SIGHUP (a closed terminal, or an operator used to "reload"), SIGHUP not when it is
    ignored (`nohup`, a supervisor): a process started so must outlive its terminal."""
    ignored = signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
    return (signal.SIGTERM, signal.SIGINT) if ignored else (
        signal.SIGTERM, signal.SIGINT, signal.SIGHUP,
    )  # fmt: skip


def unblock_stop_signals() -> None:
    """Once a process's handlers are in place: a child of `serve --workers` starts with
    SIGINT blocked (workers._spawn), and a Ctrl-C pressed while it started is handled now,
    as a stop."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, stop_signals())


def _on_signal(stop: asyncio.Event, received: list[str], signum: int) -> None:
    received.append(stopping_on(signum))
    stop.set()


def _started(settings: Settings, *, worker: bool) -> None:
    fields: dict[str, Any] = {"listen": listen_url(settings), "dashboard": dashboard_url(settings)}
    if worker:  # one of `--workers N`; the parent says service.started for all of them
        from service.workers import said_listening

        log.info("service.worker_started", pid=os.getpid(), **fields)
        said_listening()
    else:
        log.info("service.started", **fields)
        issuer_guessed(settings)
