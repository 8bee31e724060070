"""The HTTP server around the application: aiohttp's runner, with a request handler whose
answer to a request the HTTP parser refused never quotes that request back."""

from __future__ import annotations

import asyncio
import os
import re
import signal
from typing import Any

import structlog
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestHandler

from service.settings import Settings

log = structlog.get_logger(__name__)

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


class _RequestHandler(RequestHandler):
    """aiohttp's handler, but for the answer and the log line of a request that never
    reached the application: aiohttp answers the parser's message, which quotes the
    request (an Authorization header, a query string), and logs a multi-line traceback."""

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
            # Only what escapes every middleware lands here (a bug): the log has it.
            log.error("http.unhandled_error", peer=request.remote, status=status, exc_info=exc)
            body = {"error": "server_error", "error_description": "internal error"}
        response = web.json_response(body, status=status)
        response.force_close()
        return response


class _Server(web.Server):
    def __call__(self) -> RequestHandler:
        return _RequestHandler(self, loop=self._loop, **self._kwargs)


class Runner(web.AppRunner):
    """`web.AppRunner` whose connections are handled by `_RequestHandler`."""

    async def _make_server(self) -> web.Server:
        made = await super()._make_server()  # starts the application
        return _Server(
            made.request_handler,
            request_factory=made.request_factory,
            handler_cancellation=made.handler_cancellation,
            loop=asyncio.get_running_loop(),
            **made._kwargs,
        )


def listen_url(settings: Settings) -> str:
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    return f"http://{host}:{settings.port}"


def dashboard_url(settings: Settings) -> str:
    # The issuer is where browsers reach the service (PUBLIC_URL, or localhost for 0.0.0.0).
    return f"{settings.issuer.rstrip('/')}/dashboard"


def serve(app: web.Application, settings: Settings, *, reuse_port: bool = False) -> None:
    """Serve until SIGTERM or SIGINT, then let requests in flight finish and clean up."""
    try:
        asyncio.run(_serve(app, settings, reuse_port))
    except KeyboardInterrupt:  # Ctrl-C while starting, before the handlers are in place
        log.info("service.stopping", signal="SIGINT")


async def _serve(app: web.Application, settings: Settings, reuse_port: bool) -> None:
    runner = Runner(
        app,
        access_log=None,  # the request middleware writes the one line per request
        keepalive_timeout=KEEPALIVE_TIMEOUT,
        shutdown_timeout=SHUTDOWN_TIMEOUT,
    )
    await runner.setup()
    try:
        site = web.TCPSite(runner, settings.host, settings.port, reuse_port=reuse_port or None)
        await site.start()
        stop = asyncio.Event()
        received: list[str] = []
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, _on_signal, stop, received, signum)
        _started(settings, worker=reuse_port)
        await stop.wait()
        log.info("service.stopping", signal=received[0])
    finally:
        await runner.cleanup()


def _on_signal(stop: asyncio.Event, received: list[str], signum: int) -> None:
    received.append(signal.Signals(signum).name)
    stop.set()


def _started(settings: Settings, *, worker: bool) -> None:
    fields: dict[str, Any] = {"listen": listen_url(settings), "dashboard": dashboard_url(settings)}
    if worker:  # one of `--workers N`; the parent says service.started for all of them
        log.info("service.worker_started", pid=os.getpid(), **fields)
    else:
        log.info("service.started", **fields)
