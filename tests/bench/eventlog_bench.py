"""Event-log append throughput against a bare INSERT loop, and projection catch-up speed."""

from __future__ import annotations

import asyncio
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime

import asyncpg
import msgspec

from projections import snapshots
from projections.catalog import sql_projections
from projections.directory import DirectoryModel
from projections.feed import MemoryFeed
from projections.memory import PolicyModel
from projections.runner import ProjectionRunner
from service.domain import streams
from service.eventlog import EventLog, Metadata, chain
from service.events import encode
from service.storage.database import create_pool
from service.storage.embedded import pg_binary
from service.web.server import run_as_served
from tests.factories import application, populate, token

SECONDS = 5.0
#: rounds of the appending-processes figures (each ratio the median round's)
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "3"))
CONCURRENCY = (1, 16, 64)
CATCH_UP_TOKENS = 182_000
#: the application whose tokens every run of this section writes
APP = application("bench", 0)
# Built once: the runs measure writing events, not making them.
EVENTS = [
    token(APP, n) for n in range(1000)
]  # with revocations and the rest, a log of a little over 200,000


def token_stream() -> str:
    """A client_credentials token's stream as the token endpoint names it, from the token's
    SHA-256: random, so that each append's (stream_id, version) key lands anywhere in its
    btree, as in production. Ordered ids would flatter the log: on a log of 10.4 million
    events they appended about 38% more a second (18,669 against 13,502), and random ones
    wrote a full-page image for every 2 to 5 appends in the minutes after a checkpoint."""
    return streams.token_family(streams.lone_family(secrets.token_hex(32)))


#: the rows the baselines and the sketch write, as text: EVENTS' payloads, one request's metadata
PAYLOADS = [encode(e).decode() for e in EVENTS]
METADATA = msgspec.json.encode(
    Metadata(actor="client:bench", request_id="r", client_ip="192.0.2.7")
).decode()


async def rate_on(
    conns: list[asyncpg.Connection], work: Callable[[asyncpg.Connection], Awaitable[int]]
) -> float:
    """Rows a second that `work` committed on all of `conns` at once (each call returns how
    many it did); the connections are closed after."""
    started = time.perf_counter()
    counts = await asyncio.gather(*(work(conn) for conn in conns))
    elapsed = time.perf_counter() - started
    for conn in conns:
        await conn.close()
    return sum(counts) / elapsed


async def append_rate(dsn: str, concurrency: int, start_at: float | None = None) -> float:
    """Appends committed per second by one EventLog with `concurrency` appends in flight
    (from wall-clock time `start_at`, when given: processes that start together)."""
    pool = await create_pool(dsn, min_size=2, max_size=4)
    log = EventLog(pool)
    await log.start()
    meta = Metadata(actor="client:bench", request_id="r", client_ip="192.0.2.7")
    count = 0
    if start_at is not None:
        await asyncio.sleep(max(0.0, start_at - time.time()))
    deadline = time.perf_counter() + SECONDS

    async def worker() -> None:
        nonlocal count
        n = 0
        while time.perf_counter() < deadline:
            await log.append(token_stream(), 0, [EVENTS[n % len(EVENTS)]], meta)
            n += 1
            count += 1

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    await log.close()
    await pool.close()
    return count / elapsed


# A sketch of a log whose commits do not take turns, to measure what that design could
# reach here: appends insert their rows with no writers' lock (positions from a sequence,
# each row's transaction id kept and indexed), and one sealer, behind the commits, takes
# the rows whose transactions have all ended (below its snapshot's xmin) in transaction
# order, numbers them densely and chains their hashes into a table of its own, as the log
# does: each writer sends its rows' digests (service/eventlog/chain.py), kept in the row,
# and the sealer links them. Each batch holds its tokens' condition (the application's
# version) under a shared per-stream lock. Not in it: the announcement, and readers that
# read only what is sealed.
_SKETCH_TABLES = """
DROP TABLE IF EXISTS bench_sketch; DROP TABLE IF EXISTS bench_sketch_chain;
CREATE TABLE bench_sketch (LIKE events INCLUDING ALL);
ALTER TABLE bench_sketch ADD COLUMN txid xid8 NOT NULL DEFAULT pg_current_xact_id();
CREATE INDEX bench_sketch_txid ON bench_sketch (txid);
CREATE SEQUENCE IF NOT EXISTS bench_sketch_seq;
CREATE TABLE bench_sketch_chain (seq bigint PRIMARY KEY, position bigint NOT NULL,
    hash bytea NOT NULL);
-- A token's condition (its application's version) without a writers' lock: the condition's
-- stream held shared (a writer of that stream would take it exclusively), its version read
-- once the lock is granted (a statement of its own: a snapshot taken after the lock).
DROP FUNCTION IF EXISTS bench_sketch_append(text[], text[], text[], text[], text, integer);
CREATE OR REPLACE FUNCTION bench_sketch_append(p_streams text[], p_companies text[],
    p_payloads text[], p_metadata text[], p_digests bytea[], p_recorded timestamptz,
    p_condition text, p_version integer)
RETURNS boolean LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_advisory_xact_lock_shared(hashtextextended(p_condition, 0));
    IF (SELECT coalesce(max(version), 0) FROM bench_sketch WHERE stream_id = p_condition)
            <> p_version THEN
        RETURN false;
    END IF;
    INSERT INTO bench_sketch (position, stream_id, version, type, schema_version,
        company_id, payload, metadata, recorded_at, hash)
    SELECT nextval('bench_sketch_seq'), s, 1, 'AccessTokenIssued', 1, c, p::json, m::json,
        p_recorded, d
    FROM unnest(p_streams, p_companies, p_payloads, p_metadata, p_digests) AS r(s, c, p, m, d);
    RETURN true;
END $$;
"""
_SKETCH_APPEND = "SELECT bench_sketch_append($1, $2, $3, $4, $5, $6, $7, 0)"
_SETTLED = "SELECT pg_snapshot_xmin(pg_current_snapshot())"
_UNSEALED = """
SELECT position, version, hash FROM bench_sketch
WHERE txid >= $1 AND txid < $2 ORDER BY txid, position
"""
_SEAL = """
INSERT INTO bench_sketch_chain SELECT * FROM unnest($1::bigint[], $2::bigint[], $3::bytea[])
"""
#: connections of one process of `sketch_rate`, each committing its share of the rows
SKETCH_CONNECTIONS = 2


async def sketch_rate(dsn: str, concurrency: int, start_at: float) -> float:
    """Rows committed per second into the sketch by one process with `concurrency` rows in
    flight, as SKETCH_CONNECTIONS connections each committing a batch of its share."""
    size = max(1, concurrency // SKETCH_CONNECTIONS)
    conns = [await asyncpg.connect(dsn) for _ in range(SKETCH_CONNECTIONS)]
    condition = f"application-{APP.client_id}"  # every token's, as on the log
    await asyncio.sleep(max(0.0, start_at - time.time()))
    deadline = time.perf_counter() + SECONDS

    async def writer(conn: asyncpg.Connection) -> int:
        n = 0
        while time.perf_counter() < deadline:
            rows = [PAYLOADS[(n + k) % len(PAYLOADS)] for k in range(size)]
            ids = [token_stream() for _ in range(size)]
            recorded = datetime.now(UTC)
            digests = _digests(ids, rows, recorded)
            if not await conn.fetchval(_SKETCH_APPEND, ids, [APP.company_id] * size, rows,
                                       [METADATA] * size, digests, recorded,
                                       condition):  # fmt: skip
                raise RuntimeError(f"the sketch refused a batch on {condition}")
            n += size
        return n

    return await rate_on(conns, writer)


def _digests(streams: list[str], payloads: list[str], recorded: datetime) -> list[bytes]:
    """The sketch's rows' digests, as the log's writer computes an event's."""
    stamp = msgspec.json.encode(chain.timestamp(recorded)).decode()
    head = msgspec.json.encode(["AccessTokenIssued", 1, APP.company_id])[1:-1].decode()
    return [
        chain.digest_of(f'"{s}"', head, p, METADATA, stamp)  # token stream ids need no escapes
        for s, p in zip(streams, payloads, strict=True)
    ]


async def seal(dsn: str, stop: asyncio.Event) -> int:
    """The sketch's sealer, until `stop` is set and nothing settled is left: chains the
    settled rows in transaction order; returns how many it sealed."""
    conn = await asyncpg.connect(dsn)
    sealed, previous = 0, bytes(32)
    try:
        frontier = await conn.fetchval(_SETTLED)  # every row to come has a txid at or above
        while True:
            async with conn.transaction():
                settled = await conn.fetchval(_SETTLED)
                rows = await conn.fetch(_UNSEALED, frontier, settled)
                hashes = []
                for n, (_position, version, digest) in enumerate(rows):
                    previous = chain.link(previous, sealed + n + 1, version, digest)
                    hashes.append(previous)
                if rows:
                    seqs = list(range(sealed + 1, sealed + len(rows) + 1))
                    await conn.execute(_SEAL, seqs, [r[0] for r in rows], hashes)
            sealed += len(rows)
            frontier = settled
            if not rows:
                if stop.is_set():
                    return sealed
                await asyncio.sleep(0.005)
    finally:
        await conn.close()


async def appenders_rate(dsn: str, concurrency: int, processes: int) -> float:
    """Appends per second from `processes` processes, each its own EventLog, with
    `concurrency` appends in flight between them, all appending at once."""
    return await _processes([], dsn, concurrency, processes)


@dataclass
class Sketched:
    rate: float  # rows committed a second
    unsealed: int  # rows committed but not yet chained when the appends stopped
    catch_up: float  # seconds the sealer then took to chain them


async def sketched_rate(dsn: str, concurrency: int, processes: int) -> Sketched:
    """The sketch written from `processes` processes as `appenders_rate` writes the log, its
    sealer running in this one meanwhile."""
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(_SKETCH_TABLES)
        stop = asyncio.Event()
        sealer = asyncio.create_task(seal(dsn, stop))
        rate = await _processes(["--sketch"], dsn, concurrency, processes)
        written = await conn.fetchval("SELECT count(*) FROM bench_sketch")
        chained = await conn.fetchval("SELECT count(*) FROM bench_sketch_chain")
        stopped = time.perf_counter()
        stop.set()
        sealed = await sealer
    finally:
        await conn.close()
    if sealed != written:
        raise RuntimeError(f"the sketch's sealer chained {sealed:,} of {written:,} rows")
    return Sketched(rate, written - chained, time.perf_counter() - stopped)


async def _processes(mode: list[str], dsn: str, concurrency: int, processes: int) -> float:
    """Rows a second summed over `processes` processes of this module started together,
    `concurrency` in flight between them (`mode`: what they write, the log by default)."""
    start_at = time.time() + 3.0  # each process connects and starts its writer first
    argv = [sys.executable, "-m", "tests.bench.eventlog_bench", *mode, dsn, str(start_at)]
    procs = [
        await asyncio.create_subprocess_exec(
            *argv, str(concurrency // processes), stdout=subprocess.PIPE
        )
        for _ in range(processes)
    ]
    outputs = [await proc.communicate() for proc in procs]
    return sum(float(out.decode()) for out, _ in outputs)


async def bare_insert_rate(dsn: str, concurrency: int, *, same_rows: bool) -> float:
    """The baseline: one row per INSERT, one commit each, one connection per worker.

    `same_rows`: the same rows as the event log writes (payload, metadata, hash) into a
    table shaped like `events` with the same indexes; otherwise a small two-column row.
    """
    conns = [await asyncpg.connect(dsn) for _ in range(concurrency)]
    if same_rows:
        await conns[0].execute(
            "DROP TABLE IF EXISTS bench_rows; "
            "CREATE TABLE bench_rows (LIKE events INCLUDING ALL); "
            "CREATE SEQUENCE IF NOT EXISTS bench_rows_seq"
        )
        sql = (
            "INSERT INTO bench_rows (position, stream_id, version, type, schema_version, "
            "company_id, payload, metadata, recorded_at, hash) "
            "VALUES (nextval('bench_rows_seq'), $1, 1, 'AccessTokenIssued', 1, $2, $3, $4, "
            "now(), $5)"
        )
    else:
        await conns[0].execute(
            "CREATE TABLE IF NOT EXISTS bench_bare (id bigserial PRIMARY KEY, stream text, "
            "payload jsonb)"
        )
        sql = "INSERT INTO bench_bare (stream, payload) VALUES ($1, $2)"
    deadline = time.perf_counter() + SECONDS

    async def worker(conn: asyncpg.Connection) -> int:
        n = 0
        while time.perf_counter() < deadline:
            if same_rows:
                payload = PAYLOADS[n % len(PAYLOADS)]
                args = (token_stream(), APP.company_id, payload, METADATA, bytes(32))
            else:
                args = (token_stream(), '{"n": 1}')
            await conn.execute(sql, *args)
            n += 1
        return n

    return await rate_on(conns, worker)


_PGBENCH_SCRIPT = """\\set n random(1, 1000000000000)
INSERT INTO bench_rows_pgbench (position, stream_id, version, type, schema_version,
    company_id, payload, metadata, recorded_at, hash)
VALUES (nextval('bench_rows_pgbench_seq'), 'pgbench-' || :client_id || '-' || :n, 1,
    'AccessTokenIssued', 1, :company, :payload, :metadata, now(), :hash);
"""


async def pgbench_rate(dsn: str, concurrency: int) -> float | None:
    """The same-row baseline from pgbench, PostgreSQL's own C client (prepared statements,
    one row and one commit per transaction): what the server does without Python."""
    exe = str(pg_binary("pgbench")) if pg_binary("pgbench").exists() else shutil.which("pgbench")
    if exe is None:
        return None
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(
            "DROP TABLE IF EXISTS bench_rows_pgbench; "
            "CREATE TABLE bench_rows_pgbench (LIKE events INCLUDING ALL); "
            "CREATE SEQUENCE IF NOT EXISTS bench_rows_pgbench_seq"
        )
    finally:
        await conn.close()
    with tempfile.NamedTemporaryFile("w", suffix=".sql") as script:
        script.write(_PGBENCH_SCRIPT)
        script.flush()
        command = [
            exe, "--no-vacuum", "--protocol=prepared", f"--client={concurrency}",
            f"--jobs={min(concurrency, 2)}", f"--time={SECONDS:.0f}", f"--file={script.name}",
            f"--define=company={APP.company_id}", f"--define=payload={PAYLOADS[0]}",
            f"--define=metadata={METADATA}", f"--define=hash=\\x{bytes(32).hex()}", dsn,
        ]  # fmt: skip
        result = await asyncio.to_thread(
            subprocess.run, command, capture_output=True, text=True, check=False
        )
    found = re.search(r"^tps = ([0-9.]+)", result.stdout, re.MULTILINE)
    if result.returncode != 0 or found is None:
        print(f"(pgbench failed: {result.stderr.strip()[-300:]})")
        return None
    return float(found.group(1))


async def flush_latency(dsn: str, commits: int = 400) -> float:
    """What one commit's WAL flush costs on this server, in microseconds: a one-row commit
    loop on one connection, durable against `synchronous_commit` off (the median commit of
    each). The one-row-per-commit baselines are bound by it, the log's batches much less:
    the ratios to them move with the disk (on one machine: a flush of about 30 us, where
    pgbench committed twice as many rows a second as on a day of slower flushes)."""
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("DROP TABLE IF EXISTS bench_flush; CREATE TABLE bench_flush (n integer)")
        medians = []
        for setting in ("on", "off"):
            await conn.execute(f"SET synchronous_commit = {setting}")
            times = []
            for n in range(commits):
                started = time.perf_counter()
                await conn.execute(f"INSERT INTO bench_flush VALUES ({n})")
                times.append(time.perf_counter() - started)
            medians.append(sorted(times)[len(times) // 2])
        await conn.execute("DROP TABLE bench_flush")
    finally:
        await conn.close()
    return (medians[0] - medians[1]) * 1e6


async def catch_up(dsn: str) -> None:
    pool = await create_pool(dsn, min_size=2, max_size=8)
    log = EventLog(pool)
    await log.start()
    started = time.perf_counter()
    await populate(log, tokens=CATCH_UP_TOKENS, chunk=4000)
    head = await log.head()  # with the events of the append runs before
    print(f"\nlog built: {head:,} events ({time.perf_counter() - started:.1f} s)", flush=True)

    runner = ProjectionRunner(log, pool, dsn, sql_projections())
    await runner.ensure_checkpoints()
    print("\n## Projection catch-up from position 0 (SQL tables)")
    print("| projection | events read | seconds | events/s |")
    print("|---|---:|---:|---:|")
    total_elapsed = 0.0
    for name in runner.projections:
        started = time.perf_counter()
        await runner.rebuild(name)
        elapsed = time.perf_counter() - started
        total_elapsed += elapsed
        print(f"| {name} | {head:,} | {elapsed:.2f} | {head / elapsed:,.0f} |", flush=True)
    print(
        f"| all of them, one after another | {head:,} | {total_elapsed:.2f} | "
        f"{head / total_elapsed:,.0f} |"
    )

    model = PolicyModel()
    feed = MemoryFeed(log, [model], batch_size=10_000)
    started = time.perf_counter()
    await feed.catch_up()
    elapsed = time.perf_counter() - started
    print("\n## Projection catch-up from position 0 (in-memory read model)")
    print("| model | events | seconds | events/s | live tokens |")
    print("|---|---:|---:|---:|---:|")
    print(
        f"| policy | {model.position:,} | {elapsed:.2f} | {model.position / elapsed:,.0f} | "
        f"{len(model.tokens):,} |"
    )
    await snapshot(log, pool, dsn)
    await log.close()
    await pool.close()


async def snapshot(log: EventLog, pool: asyncpg.Pool, dsn: str) -> None:
    """A start's two models from the log, against a snapshot of them: written from
    nothing, then read back as a start reads it."""
    policy, directory = PolicyModel(), DirectoryModel()
    started = time.perf_counter()
    await MemoryFeed(log, [policy, directory], batch_size=10_000).catch_up()
    from_log = time.perf_counter() - started
    started = time.perf_counter()
    position = await snapshots.SnapshotWriter(log, pool, dsn, every=3600, min_events=1).write_once()
    written = time.perf_counter() - started
    size, parts = await pool.fetchrow(
        "SELECT sum(octet_length(data)), count(*) FROM model_snapshots WHERE position = $1",
        position,
    )
    started = time.perf_counter()
    restored = await snapshots.load(pool)
    loaded = time.perf_counter() - started
    if restored is None or restored.position != position:
        raise RuntimeError("the snapshot just written could not be read back")
    print("\n## Model snapshot (projections/snapshots.py), the same log")
    print("| events | live tokens | both models from the log (s) | written from nothing (s) "
          "| size | parts | read back as a start reads it (s) |")  # fmt: skip
    print("|---:|---:|---:|---:|---:|---:|---:|")
    print(
        f"| {position:,} | {len(restored.policy.tokens):,} | {from_log:.2f} | {written:.2f} | "
        f"{size / 1e6:.1f} MB | {parts} | {loaded:.2f} |"
    )


async def run(dsn: str) -> None:
    print("\n## Event-log appends (1 event per append, each awaited until committed)")
    print("Baselines, same database, same concurrency: one row per INSERT and one commit per")
    print("row, (a) the same event rows into a table shaped like `events`, same indexes,")
    print("from asyncpg; (b) a small two-column row, from asyncpg; (c) the rows of (a) from")
    print("pgbench, PostgreSQL's C client.")
    flush = await flush_latency(dsn)
    print(f"A commit's WAL flush on this server: {flush:,.0f} us (one-row commits, durable "
          "against synchronous_commit off, medians).\n")  # fmt: skip
    print(
        "| concurrency | event log (events/s) | (a) same rows (rows/s) | ratio | "
        "(b) small rows (rows/s) | ratio | (c) pgbench, same rows (rows/s) | ratio |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for concurrency in CONCURRENCY:
        same = await bare_insert_rate(dsn, concurrency, same_rows=True)
        small = await bare_insert_rate(dsn, concurrency, same_rows=False)
        native = await pgbench_rate(dsn, concurrency)
        logged = await append_rate(dsn, concurrency)
        pgbench = "n/a | n/a" if native is None else f"{native:,.0f} | {logged / native:.2f}x"
        print(
            f"| {concurrency} | {logged:,.0f} | {same:,.0f} | {logged / same:.2f}x | "
            f"{small:,.0f} | {logged / small:.2f}x | {pgbench} |",
            flush=True,
        )
    await appending_processes(dsn)
    await catch_up(dsn)


async def appending_processes(dsn: str, concurrency: int = 64, rounds: int = ROUNDS) -> None:
    """The log written from 1 and 2 processes (as `serve --workers 2`) against pgbench, in
    `rounds` rounds: each ratio is of two windows run one after the other (odd rounds run
    pgbench second), and the figure is the median round's, so that the machine's drift
    from one minute to the next moves both sides of a ratio alike."""
    print(f"\n## Event-log appends from 1 and 2 processes, {concurrency} in flight in all")
    print(f"{rounds} rounds of a {SECONDS:.0f} s window each; the ratio is the median of the "
          "rounds' ratios (their range in brackets), the rates the median round's. Beside "
          "them, a sketch of a log whose commits do not take turns, written by the same "
          "processes: the same rows with no writers' lock (each process "
          f"{SKETCH_CONNECTIONS} connections committing batches of its share, positions "
          "from a sequence, each row's transaction id indexed, each batch's condition on "
          "the application's version checked under a shared per-stream lock), and a sealer "
          "in the bench process that numbers and chains the settled rows behind the commits; against the "
          "same round's pgbench, with the most rows any round left unchained when its "
          "appends stopped.\n")  # fmt: skip
    print(
        "| appending processes | event log (events/s) | pgbench, same rows (rows/s) | ratio "
        "| sketch, same rows (rows/s) | ratio | unchained at the end |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|")
    pairs: dict[int, list[tuple[float, float | None]]] = {1: [], 2: []}
    sketches: dict[int, list[tuple[float, float | None]]] = {1: [], 2: []}
    behind: dict[int, list[Sketched]] = {1: [], 2: []}
    for round_ in range(rounds):
        for processes in (1, 2) if round_ % 2 == 0 else (2, 1):
            if round_ % 2 == 0:
                native = await pgbench_rate(dsn, concurrency)
                logged = await appenders_rate(dsn, concurrency, processes)
                sketch = await sketched_rate(dsn, concurrency, processes)
            else:
                sketch = await sketched_rate(dsn, concurrency, processes)
                logged = await appenders_rate(dsn, concurrency, processes)
                native = await pgbench_rate(dsn, concurrency)
            pairs[processes].append((logged, native))
            sketches[processes].append((sketch.rate, native))
            behind[processes].append(sketch)
    for processes in (1, 2):
        logged, native, ratio = median_pair(pairs[processes])
        sketched, _, sketch_ratio = median_pair(sketches[processes])
        most = max(behind[processes], key=lambda s: s.unsealed)
        shown = "n/a" if native is None else f"{native:,.0f}"
        print(
            f"| {processes} | {logged:,.0f} | {shown} | {ratio} | {sketched:,.0f} | "
            f"{sketch_ratio} | {most.unsealed:,} (chained {most.catch_up:.2f} s later) |",
            flush=True,
        )


def median_pair(pairs: list[tuple[float, float | None]]) -> tuple[float, float | None, str]:
    """The round whose ratio is the median: its two rates, and the ratio with the range of
    every round's ("n/a" without pgbench)."""
    measured = [(logged / native, logged, native) for logged, native in pairs if native]
    if not measured:
        return sorted(logged for logged, _ in pairs)[len(pairs) // 2], None, "n/a"
    ranked = sorted(measured)
    ratio, logged, native = ranked[len(ranked) // 2]
    return logged, native, f"{ratio:.2f}x ({ranked[0][0]:.2f}-{ranked[-1][0]:.2f}x)"


if __name__ == "__main__":
    # One appending process of `_processes`: [--sketch] DSN START_AT CONCURRENCY; prints
    # its rate.
    from service.logs import configure_logging

    configure_logging("console", "warning")  # to stderr: stdout carries the rate alone
    args = sys.argv[1:]
    rate = sketch_rate if args[0] == "--sketch" else append_rate
    dsn, start_at, concurrency = args[-3:]
    print(run_as_served(rate(dsn, int(concurrency), float(start_at))))
