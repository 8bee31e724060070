"""Token issuance and the gateway against bare aiohttp handlers, revocation propagation
between two processes, and the read model's memory per million live tokens."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import itertools
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import aiohttp
import psutil
from joserfc import jwt
from joserfc.jwk import ECKey

from projections.memory import PolicyModel, lone_family
from service import events as ev
from service.commands.directory import create_company
from service.eventlog import EPOCH, NO_METADATA, Metadata, RecordedEvent
from service.oauth.assertions import ASSERTION_TYPE
from service.runtime import open_context
from service.settings import Settings
from service.storage.database import Database, create_pool
from tests.bench import peer, wrk
from tests.bench.load import RequestSpec, Result
from tests.e2e.oauth_helpers import basic

CONNECTIONS = 64
#: wrk windows per figure (its median is reported)
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "3"))
REVOCATIONS = 1000


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@asynccontextmanager
async def process(argv: list[str], env: dict[str, str], port: int, copies: int = 1) -> Any:
    """`copies` processes of `argv` (bare handlers share the port with SO_REUSEPORT)."""
    procs = [
        subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(copies)
    ]
    try:
        # Measure only once the service is ready and its projections have applied the whole
        # log (the generated history, over 200,000 events, on a first start): /readyz says
        # ready within READY_MAX_LAG of the log, and a catch-up still running would take
        # its cores from the window. A bare handler answers anything at once.
        async with aiohttp.ClientSession() as http:
            for _ in range(3000):
                try:
                    async with http.get(f"http://127.0.0.1:{port}/readyz") as r:
                        if r.status != 503 and _caught_up(await r.read()):
                            break
                except aiohttp.ClientConnectionError:
                    pass
                await asyncio.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(30)


def _caught_up(readyz: bytes) -> bool:
    """Whether a /readyz answer shows every projection at the head (a bare handler's answer
    names none)."""
    try:
        body = json.loads(readyz)
    except ValueError:
        return True
    projections = body.get("projections", []) if isinstance(body, dict) else []
    return all(p.get("lag_events") == 0 for p in projections)


def service(dsn: str, port: int, workers: int = 1) -> tuple[list[str], dict[str, str]]:
    # Default settings, but for the two bounds on one client's issuance: a benchmark from
    # one client is exactly the flood the per-client rate limit answers with 429, and past
    # CC_TOKEN_LIMIT live tokens each issue would also supersede the oldest.
    env = {**os.environ, "DATABASE_URL": dsn, "PORT": str(port), "LOG_FORMAT": "json",
           "TOKEN_RATE_PER_CLIENT": "0", "CC_TOKEN_LIMIT": "0"}  # fmt: skip
    return [sys.executable, "-m", "service", "serve", "--workers", str(workers)], env


def bare(kind: str, port: int, *tokens: str) -> tuple[list[str], dict[str, str]]:
    return [sys.executable, "-m", "tests.bench.bare", kind, str(port), *tokens], dict(os.environ)


async def setup(dsn: str) -> tuple[dict[str, str], dict[str, Any]]:
    with tempfile.TemporaryDirectory() as tmp:
        pool = await create_pool(dsn, min_size=1, max_size=4)
        async with open_context(Settings(data_dir=Path(tmp)), database=Database(dsn, pool)) as ctx:
            company = await create_company(
                ctx, "Bench", f"bench-{time.time()}@bench.example", Metadata()
            )
        await pool.close()
    admin = {"Authorization": f"Bearer {company.admin_key}"}
    return admin, {}


async def new_app(base: str, admin: dict[str, str], **fields: Any) -> dict[str, Any]:
    body = {"name": "Bench", "grant_type": "client_credentials", "ip_allowlist": ["127.0.0.1"],
            "permissions": ["invoices:read"],
            "notification_emails": ["ops@bench.example"]} | fields  # fmt: skip
    async with (
        aiohttp.ClientSession() as http,
        http.post(f"{base}/admin/applications", headers=admin, json=body) as r,
    ):
        return dict(await r.json())


async def issue(base: str, app: dict[str, Any], count: int) -> list[str]:
    headers = basic(app["client_id"], app["client_secret"])
    async with aiohttp.ClientSession() as http:

        async def one() -> str:
            async with http.post(f"{base}/oauth/token", data={"grant_type": "client_credentials"},
                                 headers=headers) as r:  # fmt: skip
                return str((await r.json())["access_token"])

        out: list[str] = []
        for start in range(0, count, 50):
            out += await asyncio.gather(*(one() for _ in range(min(50, count - start))))
        return out


def table(title: str, rows: list[str]) -> None:
    print(f"\n## {title}")
    print(f"Each figure: the median of {ROUNDS} windows of {wrk.SECONDS} s, each server started "
          "afresh, 1 and 2 processes alternating which goes first; the range is every "
          "window's rate. \"Of bare\": the median, over the rounds, of the window's rate "
          "against the bare handler's window run beside it in the same round (the range in "
          "brackets): on a shared machine the speed drifts from one minute to the next, and "
          "a ratio of two windows a few seconds apart drifts less than one of two medians. "
          "CPU while wrk measured the median window, as a share of one core "
          f"(this machine has {os.cpu_count()}): the server measured, PostgreSQL, wrk.\n")  # fmt: skip
    print("| server | processes | requests/s | windows | p50 ms | p99 ms | errors | of bare | "
          "CPU: server | PostgreSQL | wrk |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for line in rows:
        print(line)


def row(name: str, procs: int, figure: Figure, ratio: Ratio | None = None) -> str:
    result, cpu = figure.result, figure.cpu
    shares = " | ".join("n/a" if cpu[k] is None else f"{cpu[k]:.0%}"
                        for k in ("server", "postgres", "wrk"))  # fmt: skip
    spread = f"{min(figure.rates):,.0f}-{max(figure.rates):,.0f}"
    of_bare = ratio.percent() if ratio is not None else "100%"
    return (f"| {name} | {procs} | {result.rate:,.0f} | {spread} | {result.p50_ms:.1f} | "
            f"{result.p99_ms:.1f} | {result.errors} | {of_bare} | {shares} |")  # fmt: skip


@dataclass(frozen=True)
class Ratio:
    """One server's rate against another's, round by round: each round's two windows ran
    within seconds of each other; `value` is the median of the rounds' ratios."""

    rounds: tuple[float, ...]

    @classmethod
    def of(cls, ours: list[Figure], theirs: list[Figure]) -> Ratio:
        return cls(tuple(a.rate / b.rate for a, b in zip(ours, theirs, strict=True)))

    @property
    def value(self) -> float:
        return sorted(self.rounds)[len(self.rounds) // 2]

    def percent(self) -> str:
        return f"{self.value:.0%} ({min(self.rounds) * 100:.0f}-{max(self.rounds):.0%})"

    def times(self) -> str:
        return f"{self.value:.2f}x ({min(self.rounds):.2f}-{max(self.rounds):.2f}x)"


@dataclass(frozen=True)
class Readiness:
    """What `/readyz` said while wrk measured: how often it was asked, how often it
    refused, and the most the SQL projections lagged (events, seconds) in its answers."""

    polls: int = 0
    refused: int = 0
    lag_events: int = 0
    lag_seconds: float = 0.0

    def merged(self, other: Readiness) -> Readiness:
        return Readiness(
            self.polls + other.polls,
            self.refused + other.refused,
            max(self.lag_events, other.lag_events),
            max(self.lag_seconds, other.lag_seconds),
        )


@dataclass(frozen=True)
class Figure:
    """wrk's measurement of one window, where the CPU went meanwhile (wrk.CpuMeter.shares),
    and the rates of every window it was chosen among."""

    result: Result
    cpu: dict[str, float | None]
    rates: tuple[float, ...]
    answered: int  # 2xx answers in all of them
    readiness: Readiness = Readiness()  # Tollgate's, in all of them

    @property
    def rate(self) -> float:
        return self.result.rate


#: how often /readyz is asked while wrk measures Tollgate (as a load balancer would)
READY_POLL = 0.1


async def measured(
    base: str, spec: RequestSpec, postgres: int | None, *, ready: bool = False
) -> Figure:
    """wrk's figure and the CPU shares, PostgreSQL's from its postmaster `postgres`; with
    `ready`, what `/readyz` said meanwhile."""
    meter = wrk.CpuMeter(postgres)
    polled: list[tuple[int, dict[str, Any]]] = []
    poller = asyncio.ensure_future(_poll_ready(base, polled)) if ready else None
    try:
        result = await asyncio.to_thread(
            wrk.measure, base, spec, connections=CONNECTIONS, cpu=meter
        )
    finally:
        if poller is not None:
            poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await poller
    lags = [p for _, body in polled for p in body.get("projections", [])]
    readiness = Readiness(
        len(polled),
        sum(1 for status, _ in polled if status != 200),
        max((p["lag_events"] for p in lags), default=0),
        max((p["lag_seconds"] for p in lags), default=0.0),
    )
    return Figure(result, meter.shares, (result.rate,), result.requests, readiness)


async def _poll_ready(base: str, polled: list[tuple[int, dict[str, Any]]]) -> None:
    async with aiohttp.ClientSession() as http:
        while True:
            async with http.get(f"{base}/readyz") as answer:
                polled.append((answer.status, await answer.json()))
            await asyncio.sleep(READY_POLL)


async def _postgres_pid(dsn: str) -> int | None:
    pool = await create_pool(dsn, min_size=1, max_size=1)
    try:
        directory = await pool.fetchval("SELECT current_setting('data_directory')")
    finally:
        await pool.close()
    return wrk.postgres_pid(directory)


#: another server measured beside Tollgate: its name, its argv for (port, processes), and
#: the request wrk sends it (its own credentials)
Peer = tuple[str, Callable[[int, int], list[str]], RequestSpec]


@dataclass(frozen=True)
class Compared:
    """For one number of processes: Tollgate, the bare handler and each peer (the median
    window of each), and Tollgate's ratios to the bare handler and to each peer, paired
    round by round."""

    procs: int
    ours: Figure
    baseline: Figure
    theirs: list[Figure]
    of_bare: Ratio
    of_peers: list[Ratio]  # Tollgate against each peer
    peers_of_bare: list[Ratio]  # each peer against the bare handler


async def against_bare(
    dsn: str,
    spec: RequestSpec,
    bare_kind: str,
    bare_tokens: tuple[str, ...],
    peers: Sequence[Peer] = (),
) -> tuple[list[Compared], Ratio]:
    """Tollgate, the bare handler and each peer for 1 and 2 processes, ROUNDS windows each,
    and Tollgate's 2 processes against its 1, round by round. On a shared machine one
    window moves by a third, and at times by half, from one minute to the next: the rounds
    alternate which number of processes goes first and the order of the servers, each
    server is started afresh for each window, and every ratio pairs windows of one round."""
    postgres = await _postgres_pid(dsn)

    def launched(n: int, port: int, procs: int) -> tuple[list[str], dict[str, str], int]:
        """Server n (Tollgate, the bare handler, then each peer): argv, env, copies."""
        if n == 0:
            return (*service(dsn, port, procs), 1)
        if n == 1:
            return (*bare(bare_kind, port, *bare_tokens), procs)
        return peers[n - 2][1](port, procs), dict(os.environ), 1

    specs = [spec, spec, *(peer_spec for _, _, peer_spec in peers)]
    servers = list(range(len(specs)))
    windows: dict[tuple[int, int], list[Figure]] = {}  # (processes, server) -> its windows
    for round_ in range(ROUNDS):
        for procs in (1, 2) if round_ % 2 == 0 else (2, 1):
            for n in servers if round_ % 2 == 0 else servers[::-1]:
                port = free_port()
                argv, env, copies = launched(n, port, procs)
                async with process(argv, env, port, copies) as base:
                    figure = await measured(base, specs[n], postgres, ready=n == 0)
                windows.setdefault((procs, n), []).append(figure)
    out = []
    for procs in (1, 2):
        ours, baseline, *theirs = (windows[procs, n] for n in servers)
        out.append(Compared(
            procs, median(ours), median(baseline), [median(t) for t in theirs],
            Ratio.of(ours, baseline), [Ratio.of(ours, t) for t in theirs],
            [Ratio.of(t, baseline) for t in theirs],
        ))  # fmt: skip
    return out, Ratio.of(windows[2, 0], windows[1, 0])


def median(figures: list[Figure]) -> Figure:
    """The window with the median rate, its latencies and CPU shares with it."""
    ranked = sorted(figures, key=lambda f: f.rate)
    middle = ranked[len(ranked) // 2]
    rates = tuple(f.rate for f in figures)
    readiness = functools.reduce(Readiness.merged, (f.readiness for f in figures), Readiness())
    answered = sum(f.answered for f in figures)
    return Figure(middle.result, middle.cpu, rates, answered, readiness)


async def token_endpoint(dsn: str, app: dict[str, Any]) -> None:
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    body = b"grant_type=client_credentials"
    spec: RequestSpec = (
        "POST", "/oauth/token", basic(app["client_id"], app["client_secret"]) | form, body
    )  # fmt: skip
    pool = await create_pool(dsn, min_size=1, max_size=1)
    before = await pool.fetchval("SELECT count(*) FROM events WHERE type = 'AccessTokenIssued'")
    with peer.installed() as root:
        peers: list[Peer] = []
        if root is not None:
            creds = basic(peer.CLIENT_ID, peer.CLIENT_SECRET) | form
            for package, version in peer.RELEASES:
                peers.append((
                    f"node-oidc-provider {version}",
                    functools.partial(peer.argv, root, package),
                    ("POST", "/token", creds, body),
                ))  # fmt: skip
        results, scaling = await against_bare(dsn, spec, "json", (), peers)
    after = await pool.fetchval("SELECT count(*) FROM events WHERE type = 'AccessTokenIssued'")
    await pool.close()
    rows = []
    for c in results:
        rows.append(row("bare aiohttp handler (JSON answer)", c.procs, c.baseline))
        rows.append(
            row("POST /oauth/token (each token appended to the log)", c.procs, c.ours, c.of_bare)
        )
        for (name, _, _), result, ratio in zip(peers, c.theirs, c.peers_of_bare, strict=True):
            rows.append(row(f"{name} (in memory, nothing durable)", c.procs, result, ratio))
    table(f"Token endpoint: client_credentials, wrk -t{wrk.THREADS} -c{CONNECTIONS}", rows)
    one, two = results[0].ours, results[1].ours
    print(
        f"\nTwo processes against one: {scaling.times()}, round by round. Tokens committed to "
        f"the log during the runs (warm-ups included): {after - before:,}; answered 200 in the "
        f"measured windows: {one.answered + two.answered:,}."
    )
    used = sum(share or 0.0 for share in one.cpu.values())
    cores = os.cpu_count() or 1
    print(
        f"With 1 process the machine's {cores} cores were {used / cores:.0%} busy (server, "
        f"PostgreSQL, wrk): at the same CPU per token, 2 processes could issue at most "
        f"{cores / used:.2f}x as many here."
    )
    for c in results:
        ready = c.ours.readiness
        print(
            f"{c.procs} process{'es' if c.procs > 1 else ''}: /readyz, asked every "
            f"{READY_POLL * 1000:.0f} ms while wrk measured, refused {ready.refused} of "
            f"{ready.polls}; the SQL projections at most {ready.lag_events:,} events and "
            f"{ready.lag_seconds:.2f} s behind."
        )
    for n, (name, _, _) in enumerate(peers):
        against = ", ".join(
            f"{c.procs} process{'es' if c.procs > 1 else ''} {c.of_peers[n].times()}"
            for c in results
        )
        print(f"Tollgate against {name}, round by round: {against}.")


AUTH_SECONDS = 10
ASSERTIONS = 60_000  # signed before the window: more than one process answers in it


async def drive(base: str, bodies: Iterator[bytes], headers: dict[str, str]) -> Result:
    """CONNECTIONS clients posting token requests for AUTH_SECONDS: a Python driver, since
    wrk cannot send each request its own signed assertion; both methods get the same one."""
    latencies: list[float] = []
    errors = 0
    deadline = time.perf_counter() + AUTH_SECONDS
    connector = aiohttp.TCPConnector(limit=CONNECTIONS)
    async with aiohttp.ClientSession(base, connector=connector, headers=headers) as http:

        async def client() -> None:
            nonlocal errors
            for body in bodies:
                if time.perf_counter() >= deadline:
                    return
                sent = time.perf_counter()
                async with http.post("/oauth/token", data=body) as r:
                    await r.read()
                    if r.status == 200:
                        latencies.append(time.perf_counter() - sent)
                    else:
                        errors += 1

        started = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(CONNECTIONS)))
        elapsed = time.perf_counter() - started
    latencies.sort()
    p50 = latencies[len(latencies) // 2] * 1000 if latencies else 0.0
    p99 = latencies[int(len(latencies) * 0.99)] * 1000 if latencies else 0.0
    return Result(len(latencies), errors, elapsed, p50, p99)


async def client_authentication(dsn: str, base: str, admin: dict[str, str]) -> None:
    """client_credentials with a client secret against private_key_jwt (an ES256
    assertion, each used once), through one driver in one run."""
    key = ECKey.generate_key("P-256", parameters={"kid": "bench"})
    secret_app = await new_app(base, admin)
    key_app = await new_app(
        base, admin, token_endpoint_auth_method="private_key_jwt",
        jwks={"keys": [key.as_dict(private=False)]},
    )  # fmt: skip
    now = int(time.time())
    claims = {"iss": key_app["client_id"], "sub": key_app["client_id"],
              "aud": base, "iat": now, "exp": now + 600}  # fmt: skip
    header = {"alg": "ES256", "kid": "bench"}
    assertions = [
        urlencode({"grant_type": "client_credentials", "client_assertion_type": ASSERTION_TYPE,
                   "client_assertion": jwt.encode(header, claims | {"jti": f"{n:x}"}, key)})
        .encode()
        for n in range(ASSERTIONS)
    ]  # fmt: skip
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    secret = await drive(
        base, itertools.repeat(b"grant_type=client_credentials"),
        basic(secret_app["client_id"], secret_app["client_secret"]) | form,
    )  # fmt: skip
    keyed = await drive(base, iter(assertions), form)
    print(f"\n## Token endpoint by client authentication, {CONNECTIONS} clients, "
          f"{AUTH_SECONDS} s each, one process (Python driver: a fresh assertion a request)")  # fmt: skip
    print("| client authentication | requests/s | p50 ms | p99 ms | errors | of client secret |")
    print("|---|---:|---:|---:|---:|---:|")
    print(f"| client_secret_basic | {secret.rate:,.0f} | {secret.p50_ms:.1f} | {secret.p99_ms:.1f} "
          f"| {secret.errors} | 100% |")  # fmt: skip
    print(f"| private_key_jwt (ES256) | {keyed.rate:,.0f} | {keyed.p50_ms:.1f} | {keyed.p99_ms:.1f} "
          f"| {keyed.errors} | {keyed.rate / secret.rate:.0%} |")  # fmt: skip


async def gateway(dsn: str, token: str) -> None:
    spec: RequestSpec = ("GET", "/api/v1/whoami", {"Authorization": f"Bearer {token}"}, None)
    results, _ = await against_bare(dsn, spec, "dict", (token,))
    rows = []
    for c in results:
        rows.append(row("bare aiohttp handler (SHA-256 + dict lookup)", c.procs, c.baseline))
        rows.append(
            row("Tollgate gateway (token, allow list, permission)", c.procs, c.ours, c.of_bare)
        )
    table(
        f"Gateway: GET /api/v1/whoami with a valid token, wrk -t{wrk.THREADS} -c{CONNECTIONS}", rows
    )


#: seconds of background token issuance while revocations are measured under load
LOAD_SECONDS = 30


async def propagation(
    dsn: str, base: str, admin: dict[str, str], *, under_load: bool = False
) -> None:
    port = free_port()
    background: wrk.Background | None = None
    async with process(*service(dsn, port), port) as other:
        app = await new_app(base, admin)
        count = REVOCATIONS // 5 if under_load else REVOCATIONS
        tokens = await issue(base, app, count)
        creds = basic(app["client_id"], app["client_secret"])
        delays: list[float] = []
        if under_load:  # another client takes tokens from process A all along
            busy = await new_app(base, admin)
            form = b"grant_type=client_credentials"
            headers = basic(busy["client_id"], busy["client_secret"]) | {
                "Content-Type": "application/x-www-form-urlencoded"
            }
            background = wrk.Background(base, ("POST", "/oauth/token", headers, form), LOAD_SECONDS)
            await asyncio.sleep(2)  # under way before the first revocation
        load_ends = time.perf_counter() + LOAD_SECONDS - 2
        async with aiohttp.ClientSession() as http:
            for token in tokens:  # the other process knows every token
                async with http.get(
                    f"{other}/api/v1/whoami", headers={"Authorization": f"Bearer {token}"}
                ) as r:
                    assert r.status == 200, r.status
            for token in tokens:
                async with http.post(
                    f"{base}/oauth/revoke", data={"token": token}, headers=creds
                ) as r:
                    assert r.status == 200
                revoked = time.perf_counter()
                while True:
                    async with http.get(f"{other}/api/v1/whoami",
                                        headers={"Authorization": f"Bearer {token}"}) as r:  # fmt: skip
                        if r.status == 401:
                            break
                delays.append((time.perf_counter() - revoked) * 1000)
        if background is not None and time.perf_counter() > load_ends:
            raise RuntimeError("the revocations outlasted the background load: raise LOAD_SECONDS")
        load = await asyncio.to_thread(background.result) if background else None
    delays.sort()
    print(f"\n## Revocation propagation between two processes ({len(delays):,} revocations"
          + (", under load)" if load else ")"))  # fmt: skip
    print("Revoked through process A (POST /oauth/revoke answered), then process B asked until")
    print("it refuses the token (401); the delay includes one B round trip.")
    if load is not None:
        print(f"Meanwhile wrk (1 thread, 16 connections) took client_credentials tokens from A: "
              f"{load.rate:,.0f}/s, {load.errors} errors, p99 {load.p99_ms:.1f} ms.")  # fmt: skip
    print()
    print("| p50 ms | p90 ms | p99 ms | max ms |")
    print("|---:|---:|---:|---:|")
    pick = lambda q: delays[min(len(delays) - 1, int(len(delays) * q))]  # noqa: E731
    print(f"| {pick(0.5):.1f} | {pick(0.9):.1f} | {pick(0.99):.1f} | {delays[-1]:.1f} |")


def memory_per_million() -> None:
    model = PolicyModel()
    app = ev.ApplicationCreated(
        company_id="co", client_id="app", name="App", grant_type="client_credentials",
        redirect_uri=None, ip_allowlist=["127.0.0.1"], permissions=["invoices:read", "debtors:read"],
        notification_emails=[], secret_hash="0" * 64,
    )  # fmt: skip
    model.apply(
        [RecordedEvent(1, "a", 1, "ApplicationCreated", 1, None, app, NO_METADATA, EPOCH, b"")]
    )
    gc.collect()
    before = psutil.Process().memory_info().rss
    position, now = 1, int(time.time())
    for start in range(0, 1_000_000, 10_000):
        batch = []
        for _ in range(start, start + 10_000):
            position += 1
            token_hash = os.urandom(32).hex()
            token = ev.AccessTokenIssued(
                company_id="co", client_id="app", family_id=lone_family(token_hash),
                grant_type="client_credentials", token_hash=token_hash,
                permissions=["invoices:read", "debtors:read"], issued_at=now, expires_at=None,
            )  # fmt: skip
            batch.append(RecordedEvent(position, "t", 1, "AccessTokenIssued", 1, None, token,
                                       NO_METADATA, EPOCH, b""))  # fmt: skip
        model.apply(batch)
    del batch
    gc.collect()
    after = psutil.Process().memory_info().rss
    print("\n## Read model memory")
    print(
        f"1,000,000 live client_credentials tokens in the in-memory model: "
        f"{(after - before) / 2**20:,.0f} MB of resident memory ({len(model.tokens):,} tokens)."
    )


async def run(dsn: str) -> None:
    admin, _ = await setup(dsn)
    port = free_port()
    async with process(*service(dsn, port), port) as base:
        token_app = await new_app(base, admin)
        [gateway_token] = await issue(base, await new_app(base, admin), 1)
    # While wrk measures against the bare handlers, only the processes measured run: a
    # server left up for the set-up would follow the log too, and read and apply every
    # token they issue.
    await token_endpoint(dsn, token_app)
    await gateway(dsn, gateway_token)
    async with process(*service(dsn, port), port) as base:
        await client_authentication(dsn, base, admin)
        await propagation(dsn, base, admin)
        await propagation(dsn, base, admin, under_load=True)
    # In a fresh interpreter: in this one, what the earlier sections freed would be reused
    # and the figure would depend on which sections ran before.
    program = "from tests.bench.http_bench import memory_per_million; memory_per_million()"
    await asyncio.to_thread(subprocess.run, [sys.executable, "-c", program], check=True)
