"""`tollgate serve` that cannot start says why in one line and exits non-zero."""

from __future__ import annotations

import asyncio
import os
import socket
import sys


async def serve(db, **env: str) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "service", "serve",
        env={**os.environ, "DATABASE_URL": db.dsn, "LOG_FORMAT": "json", **env},
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return process.returncode, err.decode()


async def test_a_port_in_use_is_one_line_not_a_traceback(db):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        code, err = await serve(db, HOST="127.0.0.1", PORT=str(taken.getsockname()[1]))
    assert code == 1
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("tollgate: cannot serve:")
    assert "address already in use" in err


async def test_a_port_out_of_range_is_refused_before_starting(db):
    code, err = await serve(db, PORT="99999")
    assert code == 2
    assert err.strip() == "tollgate: PORT must be from 1 to 65535, got 99999"


async def test_a_database_url_that_does_not_parse_is_refused_by_name(db):
    code, err = await serve(db, DATABASE_URL="postgresql://u@host:notaport/x")
    assert code == 2
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("tollgate: DATABASE_URL:")
