"""The service as it ships, for the contract tests: `python -m service serve` in its own
process on a real port and a database of its own, with a company, an admin key, a
resource-server key, applications and an access token made the way a user makes them."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import pytest
import requests

from service.storage.database import apply_schema

_counter = itertools.count()


@dataclass(frozen=True)
class Live:
    url: str
    admin_key: str
    resource_server_key: str
    client_id: str  # client_credentials, allow-listed for loopback
    client_secret: str
    target_client_id: str  # an authorization_code application the fuzzer may change
    access_token: str
    log: Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run(coroutine_factory) -> None:
    # A loop of our own, never installed as the thread's: pytest-asyncio keeps its own.
    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(coroutine_factory())
    finally:
        loop.close()


def _create_database(admin_dsn: str, dsn: str, name: str) -> None:
    async def create() -> None:
        admin = await asyncpg.connect(admin_dsn)
        try:
            await admin.execute(f"CREATE DATABASE {name}")
        finally:
            await admin.close()
        conn = await asyncpg.connect(dsn)
        try:
            await apply_schema(conn)
        finally:
            await conn.close()

    _run(create)


def _drop_database(admin_dsn: str, name: str) -> None:
    async def drop() -> None:
        admin = await asyncpg.connect(admin_dsn)
        try:
            await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        finally:
            await admin.close()

    _run(drop)


def _cli(env: dict[str, str], *args: str) -> dict:
    done = subprocess.run(
        [sys.executable, "-m", "service", *args],
        env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def _wait_ready(url: str, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"the service exited:\n{log.read_text()[-3000:]}")
        try:
            if requests.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except requests.ConnectionError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"the service did not become ready:\n{log.read_text()[-3000:]}")


def _populate(url: str, env: dict[str, str], log: Path) -> Live:
    company = _cli(env, "company", "create", "Acme", "--admin-email", "admin@acme.example")
    server = _cli(env, "resource-server", "create", "contract")
    admin = {"Authorization": f"Bearer {company['admin_key']}"}
    scopes = requests.get(f"{url}/.well-known/oauth-authorization-server", timeout=10).json()[
        "scopes_supported"
    ]
    made = requests.post(
        f"{url}/admin/applications", headers=admin, timeout=10,
        json={"name": "Contract client", "grant_type": "client_credentials",
              "permissions": scopes, "ip_allowlist": ["127.0.0.1", "::1"],
              "notification_emails": ["ops@contract.example"]},
    )  # fmt: skip
    assert made.status_code == 201, made.text
    client = made.json()
    target = requests.post(
        f"{url}/admin/applications", headers=admin, timeout=10,
        json={"name": "Contract target", "grant_type": "authorization_code",
              "permissions": scopes[:1], "redirect_uri": "https://app.example/callback"},
    )  # fmt: skip
    assert target.status_code == 201, target.text
    token = requests.post(
        f"{url}/oauth/token", auth=(client["client_id"], client["client_secret"]),
        data={"grant_type": "client_credentials"}, timeout=10,
    )  # fmt: skip
    assert token.status_code == 200, token.text
    return Live(
        url=url,
        admin_key=company["admin_key"],
        resource_server_key=server["key"],
        client_id=client["client_id"],
        client_secret=client["client_secret"],
        target_client_id=target.json()["client_id"],
        access_token=token.json()["access_token"],
        log=log,
    )


@pytest.fixture(scope="module")
def live(pg_server, tmp_path_factory) -> Iterator[Live]:
    name = f"tollgate_contract{os.getpid()}_{next(_counter)}"
    dsn = pg_server.dsn(name)
    _create_database(pg_server.admin_dsn, dsn, name)
    tmp = tmp_path_factory.mktemp("contract")
    port = _free_port()
    env = {**os.environ, "DATABASE_URL": dsn, "HOST": "127.0.0.1", "PORT": str(port),
           "DATA_DIR": str(tmp / "data"), "LOG_FORMAT": "json"}  # fmt: skip
    log = tmp / "service.log"
    url = f"http://127.0.0.1:{port}"
    with log.open("wb") as out:
        process = subprocess.Popen(  # the process this fixture started, ended by its handle
            [sys.executable, "-m", "service", "serve"], env=env, stdout=out, stderr=out
        )
    try:
        _wait_ready(url, process, log)
        yield _populate(url, env, log)
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        _drop_database(pg_server.admin_dsn, name)
