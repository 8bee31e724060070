"""Requests are counted in plain Python and added to the Prometheus series once per turn of
the event loop: what a scrape shows must be exactly what one observe() per request shows."""

from __future__ import annotations

import asyncio
import random

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.exposition import generate_latest

from service.metrics import _LATENCY_BUCKETS, Metrics

ROUTES = ("/oauth/token", "/api/{path}", "unmatched")


def _samples(text: bytes, prefix: str) -> dict[str, float]:
    found = {}
    for line in text.decode().splitlines():
        if line.startswith(prefix) and not line.startswith(f"{prefix}_created"):
            name, _, value = line.rpartition(" ")
            found[name] = float(value)
    return found


def _observed_one_by_one(requests: list[tuple[str, str, int, float]]) -> bytes:
    registry = CollectorRegistry()
    counter = Counter(
        "tollgate_http_requests", "", ("route", "method", "status"), registry=registry
    )
    histogram = Histogram(
        "tollgate_http_request_duration_seconds", "", ("route",), buckets=_LATENCY_BUCKETS,
        registry=registry,
    )  # fmt: skip
    for route, method, status, seconds in requests:
        counter.labels(route, method, str(status)).inc()
        histogram.labels(route).observe(seconds)
    return generate_latest(registry)


def _requests(count: int) -> list[tuple[str, str, int, float]]:
    rng = random.Random(11)
    # Bucket bounds themselves included: a value equal to a bound falls in that bucket.
    values = [*_LATENCY_BUCKETS, 0.0, 0.0004, 0.003, 0.07, 3.0, 42.0]
    return [
        (rng.choice(ROUTES), rng.choice(("GET", "POST")), rng.choice((200, 401, 503)),
         rng.choice(values))
        for _ in range(count)
    ]  # fmt: skip


def test_a_scrape_shows_what_observing_each_request_shows():
    requests = _requests(2000)
    metrics = Metrics()
    for route, method, status, seconds in requests:
        metrics.observe_request(route, method, status, seconds)
    shown = metrics.render()[0]
    expected = _observed_one_by_one(requests)
    for prefix in ("tollgate_http_requests_total", "tollgate_http_request_duration_seconds"):
        got, want = _samples(shown, prefix), _samples(expected, prefix)
        assert want and got.keys() == want.keys()
        for name, value in want.items():
            assert abs(got[name] - value) < 1e-9, name


async def test_inside_the_loop_the_counts_reach_the_series_by_the_next_turn():
    metrics = Metrics()
    requests = _requests(50)
    for route, method, status, seconds in requests:
        metrics.observe_request(route, method, status, seconds)
    await asyncio.sleep(0)  # the flush runs on the loop, before any later callback
    assert metrics._pending == {}
    assert _samples(metrics.render()[0], "tollgate_http_requests_total") == _samples(
        _observed_one_by_one(requests), "tollgate_http_requests_total"
    )
