"""`tollgate serve --workers 2`: whichever worker answers a scrape, it counts what every
worker did, and shows each worker's process metrics."""

from __future__ import annotations

import asyncio

import aiohttp
import psutil
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.hosts import admin_key, new_application, serving
from tests.e2e.oauth_helpers import basic

TOKENS = 20
SCRAPES = 8


def samples(text: str) -> list[tuple[str, dict[str, str], float]]:
    return [
        (s.name, s.labels, s.value)
        for family in text_string_to_metric_families(text)
        for s in family.samples
    ]


def total(scrape: list[tuple[str, dict[str, str], float]], name: str, **labels: str) -> float:
    return sum(
        value
        for sample, have, value in scrape
        if sample == name and all(have.get(k) == v for k, v in labels.items())
    )


async def both_listening(parent: int, port: int) -> None:
    """/healthz answered by one worker says nothing of the other: wait for its socket."""
    for _ in range(600):
        listening = [
            child
            for child in psutil.Process(parent).children()
            if any(
                c.status == psutil.CONN_LISTEN and c.laddr.port == port
                for c in child.net_connections("tcp")
            )
        ]
        if len(listening) == 2:
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the two workers never both listened")


async def test_every_scrape_of_two_workers_adds_up_what_both_did(db, tmp_path):
    key = await admin_key(db, tmp_path)
    async with serving(db, tmp_path / "data", "--workers", "2") as host:
        await both_listening(host.proc.pid, int(host.base.rsplit(":", 1)[1]))
        app = await new_application(host.base, key)
        # A new connection for each request: SO_REUSEPORT spreads connections, not requests.
        fresh = aiohttp.TCPConnector(force_close=True)
        async with aiohttp.ClientSession(connector=fresh) as http:
            for _ in range(TOKENS):
                async with http.post(
                    f"{host.base}/oauth/token",
                    data={"grant_type": "client_credentials"},
                    headers=basic(app["client_id"], app["client_secret"]),
                ) as response:
                    assert response.status == 200, await response.text()
            scrapes = []
            for _ in range(SCRAPES):
                async with http.get(f"{host.base}/metrics") as response:
                    assert response.status == 200
                    scrapes.append(samples(await response.text()))
            # What the projections process counts: it moves past every token (and the
            # events before them) on its own time, 50 ms after each step at the latest.
            tokens_projection = 0.0
            for _ in range(400):
                async with http.get(f"{host.base}/metrics") as response:
                    tokens_projection = total(
                        samples(await response.text()),
                        "tollgate_projection_events_total",
                        projection="tokens",
                    )
                if tokens_projection >= TOKENS:
                    break
                await asyncio.sleep(0.05)
        children = psutil.Process(host.proc.pid).children()
        workers = {str(p.pid) for p in children if p.cmdline()[3] == "serve"}
        [projections] = [str(p.pid) for p in children if p.cmdline()[3] == "projections"]

    issued = [
        total(s, "tollgate_tokens_issued_total", grant_type="client_credentials") for s in scrapes
    ]
    print(f"\ntokens issued as each of {SCRAPES} scrapes of two workers read it: {issued}")
    assert issued == [TOKENS] * SCRAPES
    answered = "tollgate_http_requests_total"
    assert all(total(s, answered, route="/oauth/token", status="200") == TOKENS for s in scrapes)
    assert all(total(s, "tollgate_database_up") == 1 for s in scrapes)
    # each process's own process metrics (the workers' and the projections process's), told
    # apart by pid, in every scrape
    assert len(workers) == 2
    processes = workers | {projections}
    for scrape in scrapes:
        memory = {
            labels["pid"]
            for name, labels, value in scrape
            if name == "process_resident_memory_bytes" and value > 0
        }
        assert memory == processes
        assert {
            labels["pid"] for name, labels, _ in scrape if name == "process_cpu_seconds_total"
        } == processes
    assert tokens_projection >= TOKENS
    # the parent removes the files its workers counted in
    assert list((tmp_path / "data" / "metrics").iterdir()) == []
