"""Typed application keys shared by the handlers, and per-request helpers."""

from __future__ import annotations

from dataclasses import dataclass

import aiohttp
from aiohttp import web

from service.context import Context
from service.domain.routes import RouteTable
from service.errors import TollgateError
from service.eventlog import Metadata
from service.settings import Settings
from service.storage.throttle import SignInThrottle
from service.web.client_ip import client_ip

SETTINGS = web.AppKey("settings", Settings)
REQUEST_ID = web.RequestKey("request_id", str)
CONTEXT = web.AppKey("context", Context)
ROUTES = web.AppKey("routes", RouteTable)
#: failed sign-ins, counted in PostgreSQL: one limit across processes and hosts
THROTTLE = web.AppKey("throttle", SignInThrottle)


@dataclass
class Upstream:
    """The client session to UPSTREAM_URL; None when the gateway serves whoami itself."""

    session: aiohttp.ClientSession | None = None


UPSTREAM = web.AppKey("upstream", Upstream)


def secure_cookies(request: web.Request) -> bool:
    """Whether cookies get the Secure flag: on TLS, and whenever the service is published
    as https (PUBLIC_URL), which is how it runs behind a proxy that ends TLS; there the
    socket is plain http and `request.secure` is false."""
    return request.secure or request.app[CONTEXT].settings.issuer.startswith("https://")


#: the caller's address once worked out: the handler and the request's log line both ask
_CALLER_IP = web.RequestKey("caller_ip", str)


def caller_ip(request: web.Request) -> str:
    ip = request.get(_CALLER_IP)
    if ip is None:
        ip = request[_CALLER_IP] = client_ip(request, request.app[SETTINGS].trusted_proxies)
    return ip


def remember_caller_ip(request: web.Request, app: web.Application) -> str:
    """The caller's address, worked out as a request arrives (and kept for `caller_ip`):
    every request's log line needs it, and a look-up that misses costs an exception. An
    application without settings (unit tests) takes the socket peer."""
    settings = app.get(SETTINGS)
    if settings is None:
        ip = request.remote or "unknown"
    else:
        ip = client_ip(request, settings.trusted_proxies)
    request[_CALLER_IP] = ip
    return ip


def metadata(request: web.Request, actor: str, ip: str | None = None) -> Metadata:
    return Metadata(
        actor=actor, request_id=request.get(REQUEST_ID), client_ip=ip or caller_ip(request)
    )


def authorization_header(request: web.Request, refused: type[TollgateError]) -> str | None:
    """The request's Authorization header, None without one. Sent twice, the request is
    refused (`refused`, a 400): the field is no list (RFC 9110 §11.6.2), and one reader
    taking the first and another (a proxy, a log) the last would see two callers."""
    found = request.headers.getall("Authorization", [])
    if len(found) > 1:
        raise refused("the Authorization header is given more than once")
    return found[0] if found else None
