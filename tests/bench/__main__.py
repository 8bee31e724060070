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

from service.logs import configure_logging
from service.storage.database import apply_schema, create_pool
from service.storage.embedded import EmbeddedPostgres
from service.web.server import run_as_served
from tests.bench import eventlog_bench, http_bench

SECTIONS = {"eventlog": eventlog_bench.run, "http": http_bench.run}


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
            await SECTIONS[name](url)
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
