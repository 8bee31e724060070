"""`python -m tests.bench [SECTION ...]`: run the benchmarks and print their figures.

Everything runs against one durable PostgreSQL (a fresh embedded cluster under a temporary
directory, fsync on, as `make run` uses; or BENCH_DATABASE_URL), so the figures in one
run compare like with like.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from service.eventlog import EventLog
from service.logs import configure_logging
from service.settings import mask_url
from service.storage.database import apply_schema, create_pool
from service.storage.embedded import EmbeddedPostgres
from service.web.server import run_as_served
from tests.bench import eventlog_bench, http_bench
from tests.factories import populate

SECTIONS = {"eventlog": eventlog_bench.run, "http": http_bench.run}
HTTP_DATABASE = "tollgate_bench_http"


async def http_database(url: str) -> str:
    """The HTTP section's own database, with a generated log of a fixed size (the history
    the event-log section generates, a little over 200,000 events): every server the
    section starts replays the log into its in-memory model before it is measured, and a
    figure must not depend on how many events the event-log section appended before it (in
    three runs one day: 588,581, 579,884 and 1,244,362). Without the right to create a
    database, the section runs in `url`'s, as it is."""
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(f"DROP DATABASE IF EXISTS {HTTP_DATABASE}")
        await conn.execute(f"CREATE DATABASE {HTTP_DATABASE}")
    except asyncpg.InsufficientPrivilegeError:
        print(
            f"\n(HTTP figures in {mask_url(url)}'s database: no right to create one of their own)"
        )
        return url
    finally:
        await conn.close()
    dsn = urlunsplit(urlsplit(url)._replace(path=f"/{HTTP_DATABASE}"))
    pool = await create_pool(dsn, min_size=2, max_size=8)
    try:
        async with pool.acquire() as c:
            await apply_schema(c)
        log = EventLog(pool)
        await log.start()
        head = await populate(log, tokens=eventlog_bench.CATCH_UP_TOKENS, chunk=4000)
        await log.close()
    finally:
        await pool.close()
    print(f"\n(HTTP figures on a database of their own, a generated log of {head:,} events)")
    return dsn


async def main(sections: list[str]) -> None:
    url = os.environ.get("BENCH_DATABASE_URL")
    embedded = None
    tmp = None
    if url is None:
        tmp = tempfile.TemporaryDirectory(prefix="tollgate-bench-")
        embedded = EmbeddedPostgres(Path(tmp.name) / "pg", durable=True)
        url = embedded.start()
    try:
        pool = await create_pool(url, min_size=1, max_size=4)
        async with pool.acquire() as conn:
            await apply_schema(conn)
        await pool.close()
        print(f"# Tollgate benchmarks ({os.cpu_count()} CPUs, PostgreSQL at {url})", flush=True)
        for name in sections:
            await SECTIONS[name](await http_database(url) if name == "http" else url)
    finally:
        if embedded is not None:
            embedded.stop()
        if tmp is not None:
            tmp.cleanup()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m tests.bench")
    parser.add_argument("sections", nargs="*", help=f"any of {', '.join(SECTIONS)} (default: all)")
    args = parser.parse_args()
    unknown = [s for s in args.sections if s not in SECTIONS]
    if unknown:
        parser.error(f"unknown section {unknown[0]!r}; choose from {', '.join(SECTIONS)}")
    configure_logging("console", "warning")
    # The event log is measured in this process (and its appending children) as the service
    # runs it: on the service's event loop and garbage-collector settings.
    run_as_served(main(args.sections or list(SECTIONS)))
    sys.exit(0)
