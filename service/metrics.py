"""Prometheus metrics: one registry per application, and a typed API to move them.

Nothing here is global: `create_app` builds one `Metrics` and keeps it under `METRICS`, so
two applications in one process (tests, a worker beside the service) never share a
counter. Code that counts something takes the instance from the request
(`request.app[METRICS]`) and calls a method; no caller names a Prometheus object.

Under `tollgate serve --workers N` the workers share one port, so a scrape reaches any one
of them: there (PROMETHEUS_MULTIPROC_DIR set by the parent) the counts live in files that
every worker (and the projections process) writes and every scrape sums, and the process
metrics of each of those processes carry its `pid`. A dashboard sums over `pid`, and over
`instance` for several hosts.

Every label takes its value from a closed set (a route's canonical path, a known grant
type or reason, else "other"), so no client can grow the number of series.
"""

from __future__ import annotations

import asyncio
import bisect
import functools
import os
import re
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Protocol

from aiohttp import web
from prometheus_client import (
    CollectorRegistry,
    Counter,
    GCCollector,
    Histogram,
    ProcessCollector,
    values,
)
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from service.events import (
    AccessTokenIssued,
    ApplicationDeleted,
    ApplicationTokensRevoked,
    ConnectionRevoked,
    Event,
    IpViolationDetected,
    TokenRefreshed,
    TokenRevoked,
)


class ProjectionLag(Protocol):
    """What a scrape reports of each projection (projections.runner.ProjectionStatus)."""

    @property
    def name(self) -> str: ...

    @property
    def lag_events(self) -> int: ...

    @property
    def lag_seconds(self) -> float: ...


OTHER = "other"
GRANT_TYPES = ("authorization_code", "client_credentials", "refresh_token")
#: the reasons `TokenRevoked` names (service/events.py), one token family each, then what
#: ends every token of an application (the kill switch, its deletion) or of a connection
#: at once, one each
REVOCATION_REASONS = (
    "ip_violation",
    "client_request",
    "refresh_reuse",
    "code_reuse",
    "superseded",
    "kill_switch",
    "application_deleted",
    "connection_revoked",
)
#: where `IpViolationDetected` says the credential was used
VIOLATION_ENDPOINTS = ("api", "token", "policy_check", "revoke", "introspect")
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
#: the route label of a request that matched no route (a 404, or a 405 for the path)
UNMATCHED = "unmatched"
#: what the HTTP layer answers itself, before any route (service/web/server.py): a request
#: its parser refused (4xx), one that did not arrive within BODY_TIMEOUT (408), and a
#: connection over MAX_CONNECTIONS with none idle to make room (503)
REJECTIONS = ("malformed", "timeout", "too_many_connections")
#: the status of a request whose client closed the connection before it was answered
#: (nginx's convention): never sent, but counted apart from the service's own failures
CLIENT_CLOSED_REQUEST = 499

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)


def _known(value: str, allowed: Iterable[str]) -> str:
    return value if value in allowed else OTHER


class Metrics:
    """The service's metrics, registered in a registry of their own."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        shared = multiprocess_dir()
        # Shared: the counts go to this worker's file and a scrape reads them back from
        # every worker's through MultiProcessCollector; registered here as well, this
        # worker's share would be exposed twice.
        r = None if shared is not None else self.registry
        self._requests = Counter(
            "tollgate_http_requests",
            "HTTP requests answered, by route (canonical path), method and status.",
            ("route", "method", "status"),
            registry=r,
        )
        self._latency = Histogram(
            "tollgate_http_request_duration_seconds",
            "Time to answer an HTTP request, by route (canonical path).",
            ("route",),
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self._batches = Histogram(
            "tollgate_eventlog_append_batch_size",
            "Appends committed together in one event-log transaction (group commit).",
            buckets=_BATCH_BUCKETS,
            registry=r,
        )
        self._tokens_issued = Counter(
            "tollgate_tokens_issued",
            "Access tokens issued, by grant type.",
            ("grant_type",),
            registry=r,
        )
        self._revocations = Counter(
            "tollgate_token_revocations",
            "Revocations recorded, by reason: a token family each (ip_violation, "
            "client_request, refresh_reuse, code_reuse, superseded), or every token of an "
            "application (kill_switch, application_deleted) or of a connection "
            "(connection_revoked) at once, one each.",
            ("reason",),
            registry=r,
        )
        self._violations = Counter(
            "tollgate_ip_violations",
            "Valid credentials used from outside the application's IP allow list.",
            ("endpoint",),
            registry=r,
        )
        self._projection_moved = Counter(
            "tollgate_projection_events",
            "Positions of the event log each SQL projection has moved past (applied, or not "
            "of a type it reads), by projection.",
            ("projection",),
            registry=r,
        )
        self._rejected = Counter(
            "tollgate_http_rejected",
            "Requests and connections the HTTP layer answered itself, before any route "
            "(not in tollgate_http_requests), by reason: malformed (the parser's 4xx), "
            "timeout (408, BODY_TIMEOUT), too_many_connections (503, MAX_CONNECTIONS).",
            ("reason",),
            registry=r,
        )
        self._emails_sent = Counter(
            "tollgate_emails_sent", "IP-violation emails delivered.", registry=r
        )
        self._emails_failed = Counter(
            "tollgate_emails_failed",
            "IP-violation email delivery attempts that failed.",
            registry=r,
        )
        # Known label values are exposed at zero from the start: a rate() over a series that
        # appears only with its first increment misses that increment.
        for grant in (*GRANT_TYPES, OTHER):
            self._tokens_issued.labels(grant)
        for reason in (*REVOCATION_REASONS, OTHER):
            self._revocations.labels(reason)
        for endpoint in (*VIOLATION_ENDPOINTS, OTHER):
            self._violations.labels(endpoint)
        for reason in REJECTIONS:
            self._rejected.labels(reason)
        # Each request's two series, by (route, method, status): a label look-up takes a
        # lock and builds the label tuple, and it would run twice on every request. The
        # keys come from the same closed sets as the labels, so this stays small.
        self._request_series: dict[tuple[str, str, int], tuple[Counter, Histogram]] = {}
        self._pending: dict[tuple[str, str, int], _Observed] = {}
        self._counted: dict[tuple[Counter, str], int] = {}
        self._flush_due = False
        self._measured = _Measured()
        self.registry.register(self._measured)
        if shared is None:
            ProcessCollector(registry=self.registry)
            GCCollector(registry=self.registry)  # python_gc_*: how often the collector ran
        else:
            MultiProcessCollector(self.registry, path=shared)  # type: ignore[no-untyped-call]
            self.registry.register(_WorkerProcesses(shared))

    # --- what other code counts --------------------------------------------------------

    def token_issued(self, grant_type: str) -> None:
        """An access token was issued (`grant_type` as in the token request)."""
        self._count(self._tokens_issued, _known(grant_type, GRANT_TYPES))

    def token_revoked(self, reason: str) -> None:
        """A revocation was recorded (`reason`: REVOCATION_REASONS)."""
        self._count(self._revocations, _known(reason, REVOCATION_REASONS))

    def ip_violation(self, endpoint: str) -> None:
        """A credential was used from a disallowed address (`IpViolationDetected.endpoint`)."""
        self._count(self._violations, _known(endpoint, VIOLATION_ENDPOINTS))

    def http_rejected(self, reason: str) -> None:
        """The HTTP layer answered a request or connection itself (`reason`: REJECTIONS)."""
        self._count(self._rejected, _known(reason, REJECTIONS))

    def observe_recorded(self, events: Sequence[Event]) -> None:
        """Count what the event log just recorded: tokens issued, families revoked,
        violations. Called once per committed record, whatever path recorded it."""
        for event in events:
            if isinstance(event, AccessTokenIssued):
                self.token_issued(event.grant_type)
            elif isinstance(event, TokenRefreshed):
                self.token_issued("refresh_token")
            elif isinstance(event, TokenRevoked):
                self.token_revoked(event.reason)
            elif isinstance(event, ApplicationTokensRevoked):
                self.token_revoked("kill_switch")
            elif isinstance(event, ApplicationDeleted):
                self.token_revoked("application_deleted")
            elif isinstance(event, ConnectionRevoked):
                self.token_revoked("connection_revoked")
            elif isinstance(event, IpViolationDetected):
                self.ip_violation(event.endpoint)

    def _count(self, counter: Counter, label: str) -> None:
        """One more on `counter`'s series `label`, added with the request counts once per
        turn of the event loop (and before every scrape): a series look-up and increment
        take a lock each, and under `--workers` write a shared file, on every token."""
        key = (counter, label)
        counted = self._counted
        counted[key] = counted.get(key, 0) + 1
        self._flush_soon()

    def projection_moved(self, name: str, positions: int) -> None:
        """A batch of projection `name` committed, `positions` further along the log (0: it
        starts running here). Names come from the catalog (projections/catalog.py), a
        closed set."""
        self._projection_moved.labels(name).inc(positions)

    def email_sent(self) -> None:
        self._emails_sent.inc()

    def email_failed(self) -> None:
        self._emails_failed.inc()

    # --- what the web layer and the scrape record --------------------------------------

    def observe_request(self, route: str, method: str, status: int, seconds: float) -> None:
        """`route` must be a canonical path (`/admin/applications/{client_id}`) or UNMATCHED,
        never the raw path: that is what keeps the number of series bounded.

        Counted here, added to the Prometheus series once per turn of the event loop (and
        before every scrape): each series update takes a lock, and under
        `--workers` writes a shared file."""
        key = (route, method if method in METHODS else OTHER, status)
        pending = self._pending.get(key)
        if pending is None:
            pending = self._pending[key] = _Observed(len(_LATENCY_BUCKETS) + 1)
        pending.count += 1
        pending.seconds += seconds
        pending.buckets[bisect.bisect_left(_LATENCY_BUCKETS, seconds)] += 1
        self._flush_soon()

    def _flush_soon(self) -> None:
        if self._flush_due:
            return
        self._flush_due = True
        try:
            asyncio.get_running_loop().call_soon(self.flush)
        except RuntimeError:  # no loop: at once
            self.flush()

    def flush(self) -> None:
        """Add what was counted since the last flush to the Prometheus series."""
        self._flush_due = False
        counted, self._counted = self._counted, {}
        for (counter, label), n in counted.items():
            counter.labels(label).inc(n)
        pending, self._pending = self._pending, {}
        for (route, method, status), observed in pending.items():
            series = self._request_series.get((route, method, status))
            if series is None:
                series = (
                    self._requests.labels(route, method, str(status)),
                    self._latency.labels(route),
                )
                self._request_series[(route, method, status)] = series
            requests, latency = series
            requests.inc(observed.count)
            # Histogram.observe, n observations at once: its sum, and the one bucket each
            # falls in (prometheus_client keeps them per bucket and adds them up on output).
            latency._sum.inc(observed.seconds)
            for i, n in enumerate(observed.buckets):
                if n:
                    latency._buckets[i].inc(n)

    def observe_append_batch(self, size: int) -> None:
        """One event-log commit carried `size` appends (the hook for EventLog's writer)."""
        self._batches.observe(size)

    def set_projections(self, statuses: Iterable[ProjectionLag] | None) -> None:
        """Projection lag as read at scrape time; None: it could not be read.

        An unknown lag is left out rather than reported stale: alerts on an absent series
        and on `tollgate_database_up == 0` cover it.
        """
        self._measured.statuses = None if statuses is None else list(statuses)

    def set_notifier(self, status: ProjectionLag | None) -> None:
        """How far the violation-email worker's checkpoint is behind the log, as read at
        scrape time; None: not read."""
        self._measured.notifier = status

    def set_notification_queue(self, usage: float | None) -> None:
        """`pg_notification_queue_usage()` as read at scrape time; None: not read."""
        self._measured.notification_queue = usage

    def set_model_snapshot(self, behind: tuple[int, float | None] | None) -> None:
        """Events after the newest model snapshot and its age, as read at scrape time
        (projections/snapshots.py `behind`); None: not read."""
        self._measured.snapshot = behind

    def render(self, accept: str = "") -> tuple[bytes, str]:
        """The exposition (text format, or OpenMetrics when `accept` asks) and its type."""
        self.flush()
        encoder, content_type = choose_encoder(accept)
        return encoder(self.registry), content_type


class _Observed:
    """Requests of one series since the last flush: how many, their seconds, per bucket."""

    __slots__ = ("buckets", "count", "seconds")

    def __init__(self, buckets: int) -> None:
        self.count = 0
        self.seconds = 0.0
        self.buckets = [0] * buckets


METRICS = web.AppKey("metrics", Metrics)

#: the variable prometheus_client reads, at import, to write its counts to files
MULTIPROCESS_DIR = "PROMETHEUS_MULTIPROC_DIR"


def multiprocess_dir() -> str | None:
    """The directory the workers of `serve --workers N` count in, when this process is one
    (prometheus_client chose its file-backed values at import: both must say so)."""
    if values.ValueClass is values.MutexValue:
        return None
    return os.environ.get(MULTIPROCESS_DIR) or None


def fresh_multiprocess_dir(data_dir: Path) -> Path:
    """An empty directory under DATA_DIR for one run's workers: the files of an earlier run
    would be summed into this one's counters."""
    parent = (data_dir / "metrics").resolve()
    parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix="workers-", dir=parent))


class _Measured(Collector):
    """What a scrape measures in the database all processes share (projection lag, the
    database up): the same whichever worker answers, so exposed as read, never summed."""

    def __init__(self) -> None:
        self.statuses: list[ProjectionLag] | None = None
        self.notifier: ProjectionLag | None = None
        self.notification_queue: float | None = None
        self.snapshot: tuple[int, float | None] | None = None

    def collect(self) -> Iterable[Metric]:
        yield from self._snapshot()
        up = GaugeMetricFamily(
            "tollgate_database_up",
            "1 when the last scrape could read the projection checkpoints, else 0.",
            value=0 if self.statuses is None else 1,
        )
        events = GaugeMetricFamily(
            "tollgate_projection_lag_events",
            "Events in the log that a projection has not applied yet.",
            labels=("projection",),
        )
        seconds = GaugeMetricFamily(
            "tollgate_projection_lag_seconds",
            "Age of the oldest event that a projection has not applied yet (0: caught up).",
            labels=("projection",),
        )
        for status in self.statuses or ():
            events.add_metric((status.name,), status.lag_events)
            seconds.add_metric((status.name,), status.lag_seconds)
        yield from (events, seconds, up)
        yield from self._notifier()
        if self.notification_queue is None:
            return
        yield GaugeMetricFamily(
            "tollgate_notification_queue_usage",
            "Fraction of PostgreSQL's notification queue in use (shared by the whole server). "
            "It keeps every notification until the slowest listener has read it; past "
            "tollgate.announce_below (0.05) commits stop announcing their events, and when "
            "it is full every append fails.",
            value=self.notification_queue,
        )

    def _notifier(self) -> Iterable[Metric]:
        if self.notifier is None:
            return
        yield GaugeMetricFamily(
            "tollgate_notifier_lag_events",
            "Events in the log that the IP-violation email worker has not looked at yet.",
            value=self.notifier.lag_events,
        )
        yield GaugeMetricFamily(
            "tollgate_notifier_lag_seconds",
            "Age of the oldest event the IP-violation email worker has not looked at yet "
            "(0: caught up). It follows the log within a second while it runs; one that "
            "grows means no process sends the violations' emails.",
            value=self.notifier.lag_seconds,
        )

    def _snapshot(self) -> Iterable[Metric]:
        if self.snapshot is None:
            return
        behind, age = self.snapshot
        yield GaugeMetricFamily(
            "tollgate_model_snapshot_events_behind",
            "Events a process would apply at start after the newest snapshot of its "
            "in-memory models (the whole log when there is none): what bounds a start.",
            value=behind,
        )
        if age is not None:
            yield GaugeMetricFamily(
                "tollgate_model_snapshot_age_seconds",
                "Age of the newest snapshot of the in-memory models, on the database's clock.",
                value=age,
            )


_WORKER_FILE = re.compile(r"_(\d+)\.db$")


class _WorkerProcesses(Collector):
    """`process_*` of every live process that counts in the shared directory (the workers,
    and the process that runs the SQL projections), labelled `pid`: the scrape reaches one
    worker, so it reads the others' from /proc, as ProcessCollector reads its own."""

    def __init__(self, directory: str) -> None:
        self._directory = directory

    def collect(self) -> Iterable[Metric]:
        merged: dict[str, Metric] = {}
        for pid in self._live_workers():
            reader = ProcessCollector(pid=functools.partial(str, pid), registry=None)
            for family in reader.collect():
                into = merged.setdefault(
                    family.name, Metric(family.name, family.documentation, family.type)
                )
                for sample in family.samples:
                    into.add_sample(sample.name, {**sample.labels, "pid": str(pid)}, sample.value)
        return merged.values()

    def _live_workers(self) -> list[int]:
        found = (_WORKER_FILE.search(name) for name in os.listdir(self._directory))
        pids = {int(match.group(1)) for match in found if match}
        return sorted(pid for pid in pids if os.path.exists(f"/proc/{pid}"))
