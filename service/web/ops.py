"""Operations endpoints: liveness, readiness, Prometheus metrics, and the request metrics."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import asyncpg
import structlog
from aiohttp import web
from aiohttp.typedefs import Handler

from service.eventlog import EventLogUnavailable
from service.metrics import METRICS, UNMATCHED

if TYPE_CHECKING:
    from projections.runner import ProjectionRunner, ProjectionStatus

log = structlog.get_logger(__name__)

routes = web.RouteTableDef()

# ProjectionRunner.status() queries the pool directly, so driver errors reach this far.
# InternalClientError derives from neither of asyncpg's bases: it is what a query raises
# when the server ends the connection under it (seen when the database went away).
_DB_ERRORS = (
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
    OSError,
    EventLogUnavailable,
)


@dataclass(frozen=True)
class ReadinessPolicy:
    """How far behind the log a SQL projection may be while the service is still ready."""

    max_lag_events: int = 1000
    max_lag_seconds: float = 5.0
    #: a database that takes longer than this to answer counts as unreachable
    timeout: float = 2.0


READINESS = web.AppKey("readiness", ReadinessPolicy)


def _runner(request: web.Request) -> ProjectionRunner:
    # service.app imports this module for its routes, so its keys are imported when needed.
    from service.app import RUNNER

    return request.config_dict[RUNNER]


async def _statuses(runner: ProjectionRunner, within: float) -> list[ProjectionStatus] | None:
    """Every SQL projection's status, or None when the database does not answer in time."""
    try:
        return await asyncio.wait_for(runner.status(), within)
    except (*_DB_ERRORS, TimeoutError) as exc:
        log.warning("ops.database_unreachable", error=str(exc) or type(exc).__name__)
        return None


@routes.get("/healthz")
async def healthz(_request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


@routes.get("/readyz")
async def readyz(request: web.Request) -> web.Response:
    """200 when the database answers and every SQL projection is within the policy's lag;
    503 with the reasons otherwise (a load balancer stops sending traffic meanwhile)."""
    policy = request.config_dict.get(READINESS) or ReadinessPolicy()
    statuses = await _statuses(_runner(request), policy.timeout)
    if statuses is None:
        # the driver's message stays in the log: it may name hosts and users
        return _readiness(["database unreachable"], [])
    reasons: list[str] = []
    for s in statuses:
        if s.lag_events > policy.max_lag_events:
            reasons.append(
                f"projection {s.name} is {s.lag_events} events behind "
                f"(at most {policy.max_lag_events})"
            )
        if s.lag_seconds > policy.max_lag_seconds:
            reasons.append(
                f"projection {s.name} is {s.lag_seconds:.1f} s behind "
                f"(at most {policy.max_lag_seconds:g} s)"
            )
    projections = [
        {"name": s.name, "lag_events": s.lag_events, "lag_seconds": round(s.lag_seconds, 3)}
        for s in statuses
    ]
    return _readiness(reasons, projections)


def _readiness(reasons: list[str], projections: list[dict[str, Any]]) -> web.Response:
    if reasons:
        body = {"status": "not_ready", "reasons": reasons, "projections": projections}
        return web.json_response(body, status=503, headers={"Cache-Control": "no-store"})
    body = {"status": "ready", "projections": projections}
    return web.json_response(body, headers={"Cache-Control": "no-store"})


@routes.get("/metrics")
async def metrics(request: web.Request) -> web.Response:
    """The Prometheus exposition; projection lag is read now."""
    recorder = request.config_dict[METRICS]
    runner = _runner(request)
    policy = request.config_dict.get(READINESS) or ReadinessPolicy()
    recorder.set_projections(await _statuses(runner, policy.timeout))
    body, content_type = recorder.render(request.headers.get("Accept", ""))
    return web.Response(body=body, headers={"Content-Type": content_type})


@web.middleware
async def metrics_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Counts every request by the matched route's canonical path and its final status.

    It sits inside the request-context middleware and outside the error middleware, so it
    sees the status of the rendered error (404, 500) rather than the exception. A client
    that leaves while its body is read is counted as 499 (CLIENT_CLOSED_REQUEST), apart
    from the 503s of a database in trouble; a cancelled request has no status and is not
    counted."""
    resource = request.match_info.route.resource
    route = resource.canonical if resource is not None else UNMATCHED
    recorder = request.config_dict[METRICS]
    started = time.perf_counter()
    try:
        response = await handler(request)
    except web.HTTPException as exc:  # redirects pass through the error middleware
        recorder.observe_request(route, request.method, exc.status, time.perf_counter() - started)
        raise
    except Exception:
        recorder.observe_request(route, request.method, 500, time.perf_counter() - started)
        raise
    recorder.observe_request(route, request.method, response.status, time.perf_counter() - started)
    return response
