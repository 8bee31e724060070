"""A host cut off from the network while it holds the projections' locks.

PostgreSQL frees a session's locks only once it learns that the client is gone; a host that
loses power or its network closes nothing. Here `tollgate projections run` runs in a
network namespace of its own and reaches PostgreSQL over a veth pair, as another host
would; once it holds every projection's lock, a second `projections run` stands by on this
side, the first one's link goes down and the process is killed, so that no FIN or RST ever
reaches the server. The server must drop the dead host's sessions within the peer timeouts
Tollgate's connections ask for (`PEER_TIMEOUTS`: 25 s), and the standby take every
projection over; with the server's own TCP keepalive defaults the locks stay held for over
two hours.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest

from projections.catalog import sql_projections
from projections.runner import ProjectionRunner, ProjectionStatus, lock_key
from service.eventlog import EventLog
from service.events import CompanyCreated
from service.settings import load_settings
from service.storage.database import PEER_TIMEOUTS, SESSION_CHECK, connect
from service.storage.embedded import EmbeddedPostgres
from service.web.ops import ReadinessPolicy
from tests.faults.load import FAULT_ENV, cli, digest, load, tenant, usable_at_the_gateway
from tests.faults.process import kill_everything, start
from tests.faults.test_database_faults import no_server_errors

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("ip") is None,
    reason="a network namespace needs root and iproute2's ip",
)

#: after the link goes down, how long the server may take to drop the dead host's sessions:
#: the peer timeouts, plus the standby's 2 s between attempts and room for a busy machine
DROPPED_AFTER = int(PEER_TIMEOUTS["tcp_user_timeout"]) / 1000  # the server drops a silent client
BOUND = DROPPED_AFTER + 15
#: what /readyz judges a projection's lag by when nothing is configured
DEFAULT_READINESS = ReadinessPolicy.of(load_settings({}, dotenv=False))


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


@dataclass
class Link:
    """A network namespace joined to this one by two veth pairs, each end with an
    address: one to PostgreSQL (the one cut), one for HTTP clients."""

    namespace: str
    here: str  # this side's end of the database pair
    here_address: str
    there_address: str
    http_address: str  # the namespace's end of the HTTP pair
    http_client: str  # this side's end of it, the address HTTP clients come from

    def enter(self) -> tuple[str, ...]:
        return ("ip", "netns", "exec", self.namespace)

    def cut(self) -> None:
        """This side's end down: what either side sends is dropped on the way, and the
        other side's kernel, whose link still looks up, is told nothing."""
        ip("link", "set", self.here, "down")

    def mend(self) -> None:
        ip("link", "set", self.here, "up")


def _pair(namespace: str, here: str, inside: str, subnet: str) -> None:
    ip("link", "add", here, "type", "veth", "peer", "name", inside)
    ip("link", "set", inside, "netns", namespace)
    ip("addr", "add", f"{subnet}.1/30", "dev", here)
    ip("link", "set", here, "up")
    ip("netns", "exec", namespace, "ip", "addr", "add", f"{subnet}.2/30", "dev", inside)
    ip("netns", "exec", namespace, "ip", "link", "set", inside, "up")


@pytest.fixture
def link() -> Iterator[Link]:
    tag = os.getpid() % 10_000
    namespace = f"tollgate-part-{tag}"
    pairs = [(f"tgp{tag}h", f"tgp{tag}n", f"10.213.{tag % 250}")]
    pairs.append((f"tgw{tag}h", f"tgw{tag}n", f"10.214.{tag % 250}"))
    ip("netns", "add", namespace)
    try:
        ip("netns", "exec", namespace, "ip", "link", "set", "lo", "up")
        for pair in pairs:
            _pair(namespace, *pair)
        (db_here, _, db), (_, _, http) = pairs
        yield Link(namespace, db_here, f"{db}.1", f"{db}.2", f"{http}.2", f"{http}.1")
    finally:
        pids = subprocess.run(
            ["ip", "netns", "pids", namespace], capture_output=True, text=True, check=False
        ).stdout.split()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)
        subprocess.run(["ip", "netns", "del", namespace], check=False, capture_output=True)
        for here, _, _ in pairs:
            subprocess.run(["ip", "link", "del", here], check=False, capture_output=True)


@pytest.fixture
def server(tmp_path: Path, link: Link) -> Iterator[EmbeddedPostgres]:
    """PostgreSQL listening on this side of the link (and on its socket)."""
    pg = EmbeddedPostgres(tmp_path / "pg", durable=False, listen_addresses=link.here_address)
    pg.start()
    try:
        with (pg.pgdata / "pg_hba.conf").open("a") as hba:
            network = link.here_address.rsplit(".", 1)[0] + ".0/30"
            hba.write(f"host all all {network} trust\n")
        asyncio.run(_sql(pg.dsn(), "SELECT pg_reload_conf()", "CREATE DATABASE tollgate"))
        yield pg
    finally:
        pg.stop()


async def _sql(dsn: str, *statements: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        for statement in statements:
            await conn.execute(statement)
    finally:
        await conn.close()


def run_projections(data_dir: Path, database_url: str, *prefix: str) -> subprocess.Popen[bytes]:
    data_dir.mkdir(parents=True)
    env = {**os.environ, "DATA_DIR": str(data_dir), "DATABASE_URL": database_url}
    env.update(LOG_FORMAT="json", LOG_LEVEL="info")
    with (data_dir / "projections.log").open("ab") as log:
        return subprocess.Popen(
            [*prefix, sys.executable, "-m", "service", "projections", "run"],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


async def holders(conn: asyncpg.Connection[Any]) -> dict[str, str | None]:
    """Each projection whose lock is held: the holder's address (None: the socket)."""
    names = {lock_key(p.name): p.name for p in sql_projections()}
    rows = await conn.fetch(
        """SELECT (l.classid::bigint << 32 | l.objid::bigint) AS key,
                  host(a.client_addr) AS addr
           FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
           WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1"""
    )
    held = {}
    for row in rows:
        key = row["key"] - (1 << 64) if row["key"] >= 1 << 63 else row["key"]
        if key in names:
            held[names[key]] = row["addr"]
    return held


async def until(check: Any, seconds: float, what: str) -> float:
    started = time.monotonic()
    while time.monotonic() - started < seconds:
        if await check():
            return time.monotonic() - started
        await asyncio.sleep(0.2)
    raise AssertionError(f"{what} not within {seconds:g} s")


@dataclass
class Hosts:
    """`projections run` behind the link holding every projection's lock (`there`), and
    one on this side standing by (`here`), with a connection to watch them from."""

    link: Link
    there: subprocess.Popen[bytes]
    here: subprocess.Popen[bytes]
    conn: asyncpg.Connection[Any]
    there_log: Path

    async def held(self) -> dict[str, str | None]:
        return await holders(self.conn)

    async def all_held_here(self) -> bool:
        held = await self.held()
        return set(held) == NAMES and set(held.values()) == {None}

    async def sessions_there(self) -> set[int]:
        rows = await self.conn.fetch(
            "SELECT pid FROM pg_stat_activity WHERE client_addr = $1::inet",
            self.link.there_address,
        )
        return {row["pid"] for row in rows}

    def events_there(self) -> list[dict[str, Any]]:
        found = []
        for line in self.there_log.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                found.append(json.loads(line))
        return found

    def stopped_there(self) -> set[str]:
        """The projections the cut-off host stopped running."""
        return {
            e["projection"]
            for e in self.events_there()
            if e.get("event") == "projection.restarting"
        }

    def logged_there(self, event: str) -> bool:
        return any(e.get("event") == event for e in self.events_there())


NAMES = {p.name for p in sql_projections()}


@contextlib.asynccontextmanager
async def hosts(tmp_path: Path, link: Link, server: EmbeddedPostgres) -> AsyncIterator[Hosts]:
    there = run_projections(
        tmp_path / "there",
        f"postgresql://postgres@{link.here_address}:5432/tollgate",
        *link.enter(),
    )
    here = None
    conn = await asyncpg.connect(server.dsn("tollgate"), timeout=30)
    try:

        async def all_held_there() -> bool:
            held = await holders(conn)
            return set(held) == NAMES and set(held.values()) == {link.there_address}

        await until(all_held_there, 60, "the host behind the link holding every lock")
        here = run_projections(tmp_path / "here", server.dsn("tollgate"))
        await asyncio.sleep(5)  # the standby tries every 2 s, and finds them held
        assert set((await holders(conn)).values()) == {link.there_address}
        yield Hosts(link, there, here, conn, tmp_path / "there" / "projections.log")
    finally:
        await conn.close()
        for proc in (there, here):
            if proc is not None and proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)


async def test_a_host_cut_off_loses_its_locks_and_another_takes_over(
    tmp_path: Path, link: Link, server: EmbeddedPostgres, figures: dict[str, Any]
) -> None:
    """...and the projections' lag, as every host's /readyz judges it, stays within the
    default READY_MAX_LAG through the handover while events keep being appended: no host
    is taken out of rotation for it."""
    pool = await asyncpg.create_pool(server.dsn("tollgate"), min_size=1, max_size=2)
    log = EventLog(pool)
    await log.start()
    lags = ProjectionRunner(log, pool, server.dsn("tollgate"), sql_projections())
    worst = 0.0

    async def appended() -> list[ProjectionStatus]:
        """One more event, and the lag every host's /readyz would read now."""
        nonlocal worst
        n = time.monotonic_ns()
        company = CompanyCreated(company_id=f"handover{n}", name="X")
        await log.append(f"company-handover{n}", 0, [company])
        statuses = await lags.status()
        worst = max(worst, *(s.lag_seconds for s in statuses))
        return statuses

    async def appended_and_taken_over() -> bool:
        await appended()
        return await two.all_held_here()

    async def appended_and_caught_up() -> bool:
        return all(s.lag_events <= 1 for s in await appended())

    try:
        async with hosts(tmp_path, link, server) as two:
            link.cut()
            cut_at = time.monotonic()
            os.killpg(two.there.pid, signal.SIGKILL)  # its FIN goes nowhere
            two.there.wait(10)

            async def gone() -> bool:
                return not await two.sessions_there()

            await until(appended_and_taken_over, BOUND, "every projection taken over")
            figures["taken_over_after_s"] = round(time.monotonic() - cut_at, 1)
            await until(appended_and_caught_up, 30, "the projections caught up")
            figures["worst_lag_s"] = round(worst, 1)
            await until(gone, BOUND - (time.monotonic() - cut_at), "every session dropped")
            figures["sessions_dropped_after_s"] = round(time.monotonic() - cut_at, 1)
    finally:
        await log.close()
        await pool.close()
    # Not sooner than a live host could be told from a dead one: the server waited for its
    # probes to go unanswered (the lock sessions last spoke at most SESSION_CHECK before
    # the cut), it did not drop the sessions on the link going down.
    assert figures["taken_over_after_s"] >= DROPPED_AFTER - SESSION_CHECK
    # The events appended during the cut waited for the whole handover, and /readyz on
    # every host said ready meanwhile.
    assert DROPPED_AFTER - SESSION_CHECK <= worst < DEFAULT_READINESS.max_lag_seconds, figures


async def test_a_host_cut_off_stops_before_its_locks_go_and_is_back_as_a_standby(
    tmp_path: Path, link: Link, server: EmbeddedPostgres, figures: dict[str, Any]
) -> None:
    """The host behind the link lives on: it must stop working before the server frees
    its locks (or two runners would work at once, and two notifiers send an email twice),
    and once the link is back, stand by, and listen again on a session that exists."""
    async with hosts(tmp_path, link, server) as two:
        link.cut()
        cut_at = time.monotonic()
        stopped_at = None
        while not await two.all_held_here():
            if stopped_at is None and two.stopped_there() == NAMES:
                stopped_at = time.monotonic() - cut_at
            assert time.monotonic() - cut_at < BOUND, "every projection taken over"
            await asyncio.sleep(0.2)
        taken_at = time.monotonic() - cut_at
        figures.update(stopped_after_s=stopped_at and round(stopped_at, 1))
        figures.update(taken_over_after_s=round(taken_at, 1))
        assert stopped_at is not None and stopped_at < taken_at, figures

        link.mend()
        mended_at = time.monotonic()
        before = await two.sessions_there()  # what the server still keeps of the cut, if any

        async def listening_again() -> bool:
            # A session of the host's that stays (its lock attempts last milliseconds)
            # once its listener said the old one was lost.
            if not two.logged_there("eventlog.listener_lost"):
                return False
            first = await two.sessions_there() - before
            await asyncio.sleep(2)
            return bool(first & await two.sessions_there())

        await until(listening_again, 90, "the host behind the link listening again")
        figures["listening_again_after_mend_s"] = round(time.monotonic() - mended_at, 1)
        await asyncio.sleep(5)  # its standby tries every 2 s: the locks stay here
        assert await two.all_held_here()
        assert two.there.poll() is None  # it lives on, standing by
        # What it logged of the cut says what failed (a timeout's own message is empty).
        errors = [e["error"] for e in two.events_there() if "error" in e]
        assert errors and all(errors), errors


DB_TIMEOUT = 2
STALENESS = 10  # POLICY_MAX_STALENESS, its default


async def issued(http: aiohttp.ClientSession, base: str, who: Any) -> str:
    form = {"grant_type": "client_credentials"}
    async with http.post(f"{base}/oauth/token", data=form, headers=who.credentials) as r:
        assert r.status == 200, await r.text()
        return str((await r.json())["access_token"])


async def test_a_service_cut_off_from_its_database_answers_within_the_bound_and_serves_again(
    tmp_path: Path, link: Link, server: EmbeddedPostgres, figures: dict[str, Any]
) -> None:
    """`tollgate serve` behind the link, its clients on a second pair that stays up; under
    load the database's pair goes down for longer than the peer timeouts (the server drops
    every session of the service meanwhile), then comes back. Every answer within the
    bound, 503 while the database cannot be reached, served again once it can, and no
    acknowledged write lost."""
    service = start(
        tmp_path / "data",
        prefix=link.enter(),
        HOST=link.http_address,
        DATABASE_URL=f"postgresql://postgres@{link.here_address}:5432/tollgate",
        DB_TIMEOUT=str(DB_TIMEOUT),
        POLICY_MAX_STALENESS=str(STALENESS),
        **FAULT_ENV,
    )
    try:
        await service.wait_status(200, 90)
        who = await tenant(service, ip_allowlist=[link.http_client])
        cut_for = DROPPED_AFTER + 10
        timeline: dict[str, float] = {}
        before_the_cut: list[str] = []

        async def cut_and_mend() -> None:
            form = {"grant_type": "client_credentials"}
            async with aiohttp.ClientSession() as http:
                token = await issued(http, service.base, who)
                before_the_cut.append(token)
                await asyncio.sleep(3)
                link.cut()
                cut_at = time.monotonic()
                await asyncio.sleep(5)
                # The gateway decides from memory: a token issued before goes on working,
                # while what it holds of the log is within POLICY_MAX_STALENESS.
                whoami = f"{service.base}/api/v1/whoami"
                auth = {"Authorization": f"Bearer {token}"}
                async with http.get(whoami, headers=auth) as r:
                    timeline["gateway_while_cut_off"] = r.status
                # Out of the balancer's rotation, not restarted by its supervisor.
                for probe in ("readyz", "healthz"):
                    asked = time.monotonic()
                    async with http.get(f"{service.base}/{probe}") as r:
                        timeline[f"{probe}_while_cut_off"] = r.status
                    timeline[f"{probe}_answered_in_s"] = round(time.monotonic() - asked, 2)
                # Past it, nothing is decided from a view that old: a revocation made
                # through another host meanwhile would be missed.
                await asyncio.sleep(cut_at + STALENESS + 2 - time.monotonic())
                asked = time.monotonic()
                async with http.get(whoami, headers=auth) as r:
                    timeline["gateway_past_the_staleness_bound"] = r.status
                timeline["gateway_answered_in_s"] = round(time.monotonic() - asked, 2)
                await asyncio.sleep(cut_at + cut_for - time.monotonic())
                link.mend()
                mended_at = time.monotonic()
                while True:
                    async with http.post(
                        f"{service.base}/oauth/token", data=form, headers=who.credentials
                    ) as r:
                        if r.status == 200:
                            break
                    assert time.monotonic() - mended_at < 60, "never served again"
                    await asyncio.sleep(0.1)
                timeline["served_again_after_mend_s"] = round(time.monotonic() - mended_at, 1)
                while True:
                    async with http.get(f"{service.base}/readyz") as r:
                        if r.status == 200:
                            break
                    assert time.monotonic() - mended_at < 60, "never ready again"
                    await asyncio.sleep(0.2)
                timeline["ready_again_after_mend_s"] = round(time.monotonic() - mended_at, 1)

        tally, _ = await asyncio.gather(
            load(service.base, who, seconds=cut_for + 15, requests=300), cut_and_mend()
        )
        no_server_errors(tally)
        assert tally.longest < DB_TIMEOUT + 3, (tally.longest, tally.statuses)
        assert tally.statuses[503] > 0, tally.statuses  # the cut was felt
        assert timeline["gateway_while_cut_off"] == 200
        assert timeline["gateway_past_the_staleness_bound"] == 503, timeline
        assert timeline["gateway_answered_in_s"] < DB_TIMEOUT + 3, timeline
        assert (timeline["readyz_while_cut_off"], timeline["healthz_while_cut_off"]) == (503, 200)
        assert max(timeline["readyz_answered_in_s"], timeline["healthz_answered_in_s"]) < 5
        after = await load(service.base, who, seconds=3, clients=2, requests=20)
        assert after.statuses == {200: after.statuses.total()}, after.statuses
        tokens = tally.tokens + after.tokens + before_the_cut
        await usable_at_the_gateway(service.base, tokens)
        assert service.stop() == 0
        conn = await asyncpg.connect(server.dsn("tollgate"))
        try:
            logged = {
                r["h"]
                for r in await conn.fetch(
                    "SELECT payload->>'token_hash' AS h FROM events"
                    " WHERE type = 'AccessTokenIssued'"
                )
            }
        finally:
            await conn.close()
        assert not [t for t in tokens if digest(t) not in logged]
        verified = cli(service, "audit", "verify", dsn=server.dsn("tollgate"))
        assert verified.returncode == 0, verified.stdout + verified.stderr
        figures.update(
            timeline,
            cut_s=cut_for,
            tokens=len(tokens),
            longest_answer_s=round(tally.longest, 2),
            answers=dict(tally.statuses),
        )
    finally:
        kill_everything(service)


async def test_the_server_is_asked_for_the_peer_timeouts_over_tcp(
    link: Link, server: EmbeddedPostgres
) -> None:
    """Over a Unix socket the settings read 0 whatever is asked: over TCP, what
    `connect` (and the pool, with the same settings) sends is what the session runs with,
    and a setting DATABASE_URL names, in any case, is its own."""
    url = f"postgresql://postgres@{link.here_address}:5432/tollgate"
    shown = "SELECT name, setting FROM pg_settings WHERE name = ANY($1::text[])"
    names = list(PEER_TIMEOUTS)
    conn = await connect(url)
    try:
        assert dict(await conn.fetch(shown, names)) == PEER_TIMEOUTS
    finally:
        await conn.close()
    conn = await connect(f"{url}?tcp_keepalives_idle=60&TCP_USER_TIMEOUT=30000")
    try:
        expected = PEER_TIMEOUTS | {"tcp_keepalives_idle": "60", "tcp_user_timeout": "30000"}
        assert dict(await conn.fetch(shown, names)) == expected
    finally:
        await conn.close()
    # The URL's `options`, which the server applies before the startup parameters, and a
    # blank setting, which asyncpg leaves out: neither overridden nor left without a value.
    conn = await connect(f"{url}?options=-c%20tcp_keepalives_count%3D4&tcp_user_timeout=")
    try:
        expected = PEER_TIMEOUTS | {"tcp_keepalives_count": "4"}
        assert dict(await conn.fetch(shown, names)) == expected
    finally:
        await conn.close()
