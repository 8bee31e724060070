"""The log of a real `tollgate serve`: one JSON object a line whatever a client sends, no
credential in it or in any answer, a client that leaves is not a database failure, and
security events are warnings that say who and from where."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import psutil
import pytest

from service.commands.directory import create_company
from service.domain.credentials import digest
from service.eventlog import Metadata
from service.runtime import open_context
from service.settings import Settings
from service.storage.database import Database
from tests.e2e.oauth_helpers import basic
from tests.e2e.test_make_run import free_port
from tests.e2e.test_scale_out import cc_app

MALFORMED_ROUNDS = 2000  # a bounded flood: enough that anything per request shows up


@dataclass
class Running:
    port: int
    proc: subprocess.Popen[bytes]
    stderr: Path

    def text(self) -> str:
        return self.stderr.read_text(errors="replace")

    def events(self) -> list[dict]:
        """Every line of stderr, parsed: a line that is not a JSON object fails the test."""
        parsed = []
        for line in self.text().splitlines():
            entry = json.loads(line)
            assert isinstance(entry, dict) and "event" in entry, line
            parsed.append(entry)
        return parsed

    def named(self, event: str) -> list[dict]:
        return [e for e in self.events() if e["event"] == event]


@asynccontextmanager
async def serving(db, tmp_path: Path, *args: str, **env: str) -> AsyncIterator[Running]:
    port = free_port()
    stderr = tmp_path / f"stderr-{port}.log"
    with stderr.open("wb") as sink:  # a file, not a pipe: thousands of lines never block it
        proc = subprocess.Popen(
            [sys.executable, "-m", "service", "serve", *args],
            env={
                **os.environ,
                "DATABASE_URL": db.dsn,
                "HOST": "127.0.0.1",
                "PORT": str(port),
                "LOG_FORMAT": "json",
                "LOG_LEVEL": "info",
                "DATA_DIR": str(tmp_path / "data"),
                **env,
            },
            stdout=subprocess.DEVNULL,
            stderr=sink,
            start_new_session=True,
        )
    running = Running(port, proc, stderr)
    try:
        await _healthy(running)
        yield running
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)


async def _healthy(running: Running) -> None:
    async with aiohttp.ClientSession() as http:
        for _ in range(600):
            assert running.proc.poll() is None, running.text()
            try:
                async with http.get(f"http://127.0.0.1:{running.port}/healthz") as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientConnectionError:
                pass
            await asyncio.sleep(0.1)
    raise AssertionError("the service never answered /healthz")


async def until_logged(running: Running, event: str, count: int, seconds: float = 15) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if len(running.named(event)) >= count:
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"fewer than {count} {event} lines:\n{running.text()[-3000:]}")


async def exchange(port: int, data: bytes) -> bytes:
    """One request over a raw socket (aiohttp's client would refuse to send these)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), 15)
    except ConnectionResetError:  # the server closed on bytes it had not read
        return b""
    finally:
        writer.close()


def leaked(secret: str, text: str) -> bool:
    """Any 16 characters of `secret` in `text`: a truncated echo leaks too."""
    return any(secret[i : i + 16] in text for i in range(len(secret) - 15))


@dataclass
class Credentials:
    company_admin: dict[str, str]
    admin_email: str
    client_id: str
    client_secret: str
    token: str

    @property
    def basic_value(self) -> str:
        return basic(self.client_id, self.client_secret)["Authorization"].split(" ", 1)[1]


async def credentials(db, tmp_path: Path, running: Running) -> Credentials:
    settings = Settings(data_dir=tmp_path)
    async with open_context(settings, database=Database(db.dsn, db.pool)) as ctx:
        made = await create_company(ctx, "Acme", "admin@acme.example", Metadata(actor="test"))
    admin = {"Authorization": f"Bearer {made.admin_key}"}
    async with aiohttp.ClientSession(f"http://127.0.0.1:{running.port}") as http:
        app = await cc_app(http, made, "Logged")
        async with http.post(
            "/oauth/token",
            data={"grant_type": "client_credentials"},
            headers=basic(app["client_id"], app["client_secret"]),
        ) as response:
            assert response.status == 200, await response.text()
            token = (await response.json())["access_token"]
    return Credentials(admin, made.admin_email, app["client_id"], app["client_secret"], token)


def malformed(c: Credentials) -> list[bytes]:
    """Requests the HTTP parser refuses, each carrying a live credential."""
    t, s, b = c.token.encode(), c.client_secret.encode(), c.basic_value.encode()
    head = b"GET /api/v1/whoami HTTP/1.1\r\nHost: tollgate\r\nConnection: close\r\n"
    pad = b"A" * 9000
    return [
        head + b"Authorization: Bearer " + t + b"\x7f\r\n\r\n",
        head + b"Authorization: Bearer " + t + b"\x00\r\n\r\n",
        head + b"Authorization: Bearer " + t + b"\rX-Other: 1\r\n\r\n",
        head + b"Authorization: Basic " + b + b"\x00\r\n\r\n",
        head + b"Cookie: tg_session=" + t + b"\x01\r\n\r\n",
        head + b"X-Auth " + t + b": Bearer " + t + b"\r\n\r\n",  # a space in a header name
        head + b"Auth(" + s + b"): 1\r\n\r\n",
        b"GET /oauth/token?client_secret=" + s + b"&client_id=" + c.client_id.encode()
        + b"&pad=" + pad + b" HTTP/1.1\r\nHost: tollgate\r\n\r\n",
        b"GET /?access_token=" + t + b"&pad=" + pad + b" HTTP/1.1\r\nHost: tollgate\r\n\r\n",
        b"GET /?authorization=Basic%20" + b + b"&pad=" + pad + b" HTTP/1.1\r\nHost: t\r\n\r\n",
        b"GET /" + s + pad + b" HTTP/1.1\r\nHost: tollgate\r\n\r\n",
        head + b"Authorization: Bearer " + t + pad + b"\r\n\r\n",
        head + b"Authorization: Basic " + b + pad + b"\r\n\r\n",
        head + b"X-Client-Secret: " + s + pad + b"\r\n\r\n",
        b"\x16\x03\x01" + t + b"\r\n\r\n",
        b"POST /oauth/token HTTP/1.1\r\nHost: tollgate\r\nTransfer-Encoding: chunked\r\n"
        b"Content-Type: application/x-www-form-urlencoded\r\n\r\n" + t + b"\r\n\r\n",
    ]  # fmt: skip


def basic_non_ascii(c: Credentials) -> list[bytes]:
    """Well-formed HTTP whose Basic value holds a byte outside ASCII: the application's
    own answer (invalid_client) must not quote it either."""
    body = b"grant_type=client_credentials"
    return [
        b"POST /oauth/token HTTP/1.1\r\nHost: tollgate\r\nConnection: close\r\n"
        b"Content-Type: application/x-www-form-urlencoded\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\n"
        b"Authorization: Basic " + value + b"\r\n\r\n" + body
        for value in (c.basic_value.encode() + b"\xff", b"\xe9" + c.basic_value.encode())
    ]


def assert_no_credential(c: Credentials, text: str) -> None:
    for secret in (c.token, c.client_secret, c.basic_value):
        assert not leaked(secret, text), f"{secret[:8]}… is in:\n{text[:2000]}"


async def test_requests_the_parser_refuses_leak_no_credential_and_log_one_json_line(db, tmp_path):
    async with serving(db, tmp_path) as running:
        c = await credentials(db, tmp_path, running)
        requests = malformed(c)
        answers = [await exchange(running.port, request) for request in requests]
        answers += [await exchange(running.port, r) for r in basic_non_ascii(c)]

        async def flood(worker: int) -> None:
            for i in range(worker, MALFORMED_ROUNDS, 8):
                await exchange(running.port, requests[i % len(requests)])

        await asyncio.gather(*(flood(w) for w in range(8)))
        assert running.proc.poll() is None
    # The service has stopped: its log is complete.
    for answer in answers:
        assert_no_credential(c, answer.decode("latin-1"))
    log = running.text()
    assert_no_credential(c, log)
    # The server closes on a line too long before it has read the rest of it: the kernel
    # may then reset the connection and drop the answer. Short requests are always answered.
    short = [a for r, a in zip(requests, answers, strict=False) if len(r) < 8190]
    assert all(short), answers
    refused = [a for a in answers[: len(requests)] if a]
    for answer in refused:
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.split(b"\r\n")[0].split()[1] == b"400", answer[:300]
        assert json.loads(body)["error"] == "invalid_request", body
    for answer in answers[len(requests) :]:
        assert answer.startswith(b"HTTP/1.1 401"), answer[:300]
        assert b'"invalid_client"' in answer
    events = running.events()  # every line is one JSON object
    assert not [e for e in events if e["level"] in ("error", "critical")], log[-3000:]
    refusals = [e for e in events if e["event"] == "http.malformed_request"]
    assert len(refusals) >= MALFORMED_ROUNDS
    assert {e["peer"] for e in refusals} == {"127.0.0.1"}
    assert "Invalid header value char" in {e["reason"] for e in refusals}


async def test_what_aiohttp_answered_before_the_application_is_answered_and_logged_by_it(
    db, tmp_path
):
    """`OPTIONS *`, `CONNECT host:port` and an expectation other than 100-continue were
    answered by aiohttp before any middleware: a text/plain 404 or 417, with no request id,
    no log line and no count. The application answers them now: a JSON 404 for a target
    that is no path, and the request itself when the expectation is one it cannot meet
    (RFC 9110 §10.1.1 lets it go unmet)."""
    async with serving(db, tmp_path) as running:
        c = await credentials(db, tmp_path, running)
        body = b"grant_type=client_credentials"
        token = (
            b"POST /oauth/token HTTP/1.1\r\nHost: t\r\nConnection: close\r\nExpect: 200-ok\r\n"
            b"Content-Type: application/x-www-form-urlencoded\r\nAuthorization: Basic "
            + c.basic_value.encode() + b"\r\nContent-Length: " + str(len(body)).encode()
            + b"\r\n\r\n" + body
        )  # fmt: skip
        answers = [
            await exchange(
                running.port, b"OPTIONS * HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
            ),
            await exchange(
                running.port,
                b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\nConnection: close\r\n\r\n",
            ),
            await exchange(running.port, token),
            # an absolute-form target is a path already (RFC 9112 §3.2.2)
            await exchange(
                running.port,
                b"GET http://t/healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
            ),
            # an unmet expectation beside a header byte outside UTF-8: not a 500
            await exchange(
                running.port,
                b"GET /healthz HTTP/1.1\r\nHost: t\r\nExpect: foo\r\nX-A: \xff\r\n"
                b"Connection: close\r\n\r\n",
            ),
        ]
    statuses = []
    for answer in answers:
        head, _, text = answer.partition(b"\r\n\r\n")
        statuses.append(int(head.split()[1]))
        assert b"X-Request-Id: " in head, head
        assert b"Content-Type: application/json" in head, head
        json.loads(text)
    assert statuses == [404, 404, 200, 200, 200], answers
    logged = {(e["method"], e["path"], e["status"]) for e in running.events()
              if e["event"] == "http.request"}  # fmt: skip
    assert {("OPTIONS", "/*", 404), ("CONNECT", "/example.com:443", 404),
            ("POST", "/oauth/token", 200), ("GET", "/healthz", 200)} <= logged  # fmt: skip
    assert not [e for e in running.events() if e["level"] in ("error", "critical")]


async def test_a_client_that_leaves_mid_body_is_a_499_not_a_database_failure(db, tmp_path):
    leaving = [
        ("/oauth/token", "application/x-www-form-urlencoded", b"grant_type=client_"),
        ("/session", "application/json", b'{"email": "a'),
    ] * 3
    async with serving(db, tmp_path) as running:
        for path, content_type, part in leaving:
            reader, writer = await asyncio.open_connection("127.0.0.1", running.port)
            writer.write(
                f"POST {path} HTTP/1.1\r\nHost: tollgate\r\nContent-Type: {content_type}\r\n"
                f"Content-Length: 1000\r\nExpect: 100-continue\r\n\r\n".encode()
            )
            # aiohttp says 100 Continue as it hands the request to the application: from
            # then on a handler is waiting for the body.
            assert await reader.readuntil(b"\r\n\r\n") == b"HTTP/1.1 100 Continue\r\n\r\n"
            writer.write(part)
            await writer.drain()
            await asyncio.sleep(0.05)
            writer.transport.abort()
        await until_logged(running, "http.client_disconnected", len(leaving))
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"http://127.0.0.1:{running.port}/metrics") as response,
        ):
            metrics = await response.text()
    assert not running.named("http.database_unavailable")
    left = running.named("http.client_disconnected")
    assert {(e["level"], e["ip"]) for e in left} == {("info", "127.0.0.1")}
    requests = [e for e in running.named("http.request") if e["method"] == "POST"]
    assert sorted(e["status"] for e in requests) == [499] * len(leaving)
    counted = [
        line for line in metrics.splitlines() if line.startswith("tollgate_http_requests_total{")
    ]
    assert not [line for line in counted if 'status="503"' in line], counted
    for route in ("/oauth/token", "/session"):
        line = f'tollgate_http_requests_total{{method="POST",route="{route}",status="499"}} 3.0'
        assert line in counted, counted


async def test_security_events_are_warnings_naming_who_and_from_where(db, tmp_path):
    wrong_password = "Not-The-Password-5b1e9c"
    async with serving(db, tmp_path, TRUSTED_PROXIES="127.0.0.1") as running:
        c = await credentials(db, tmp_path, running)
        base = f"http://127.0.0.1:{running.port}"
        creds = basic(c.client_id, c.client_secret)
        form = {"grant_type": "client_credentials"}
        async with aiohttp.ClientSession(base) as http:
            # a live token used from outside the allow list: revoked, and a warning
            outside = {"Authorization": f"Bearer {c.token}", "X-Forwarded-For": "203.0.113.7",
                       "X-Request-Id": "req-outside"}  # fmt: skip
            async with http.get("/api/v1/whoami", headers=outside) as r:
                assert r.status == 403
            # the right secret from outside the allow list, at the token endpoint
            elsewhere = {**creds, "X-Forwarded-For": "198.51.100.4"}
            async with http.post("/oauth/token", data=form, headers=elsewhere) as r:
                assert r.status == 403
            wrong = basic(c.client_id, c.client_secret[::-1])
            async with http.post("/oauth/token", data=form, headers=wrong) as r:
                assert r.status == 401
            rotate = f"/admin/applications/{c.client_id}/rotate-secret"
            async with http.post(rotate, headers=c.company_admin) as r:
                assert r.status == 200
                new_secret = (await r.json())["client_secret"]
            async with http.post("/oauth/token", data=form, headers=creds) as r:
                assert r.status == 401  # the old secret
            sign_in = {"email": c.admin_email, "password": wrong_password}
            async with http.post("/session", json=sign_in) as r:
                assert r.status == 401
            # a password typed into the address field, which is no address
            misplaced = {"email": "Tr0ub4dor&3-MyRealPassw0rd", "password": "x"}
            async with http.post("/session", json=misplaced) as r:
                assert r.status == 401
    warnings = {e["event"]: e for e in running.events() if e["level"] == "warning"}
    violations = running.named("security.ip_violation")
    assert {(e["level"], e["ip"], e["endpoint"], e["token_revoked"]) for e in violations} == {
        ("warning", "203.0.113.7", "api", True),
        ("warning", "198.51.100.4", "token", False),
    }
    assert {e["client_id"] for e in violations} == {c.client_id}
    # each event says which request it came from, as the request's own line does
    [api] = [e for e in violations if e["endpoint"] == "api"]
    assert api["request_id"] == "req-outside"
    [token_violation] = [e for e in violations if e["endpoint"] == "token"]
    lines = {e["request_id"]: e for e in running.named("http.request")}
    assert lines[token_violation["request_id"]]["path"] == "/oauth/token"
    assert lines["req-outside"]["path"] == "/api/v1/whoami"
    assert warnings["security.client_secret_wrong"]["client_id"] == c.client_id
    assert warnings["security.client_secret_wrong"]["ip"] == "127.0.0.1"
    assert warnings["security.old_client_secret_used"]["client_id"] == c.client_id
    failed = running.named("security.sign_in_failed")
    assert (failed[0]["email"], failed[0]["ip"]) == (c.admin_email, "127.0.0.1")
    assert failed[1]["email"] == "not-an-address"
    # request lines carry the caller's address as TRUSTED_PROXIES decides it
    requests = running.named("http.request")
    assert all("ip" in e for e in requests)
    assert {e["ip"] for e in requests if e["path"] == "/api/v1/whoami"} == {"203.0.113.7"}
    log = running.text()
    assert_no_credential(c, log)
    assert not leaked(new_secret, log)
    assert wrong_password not in log
    assert "Tr0ub4dor" not in log
    stored = await db.pool.fetchval("SELECT string_agg(key, ' ') FROM sign_in_failures")
    assert "not-an-address|" in stored and "Tr0ub4dor" not in stored.lower()
    # nothing a guess could be checked against: not even a digest of the misplaced text
    misplaced_digest = digest("Tr0ub4dor&3-MyRealPassw0rd")
    assert misplaced_digest[:16] not in log and misplaced_digest[:16] not in stored
    assert c.company_admin["Authorization"].split()[1] not in log


async def test_the_start_up_line_names_where_it_listens_and_the_dashboard(db, tmp_path):
    async with serving(db, tmp_path) as running:
        pass
    assert running.proc.returncode == 0
    url = f"http://127.0.0.1:{running.port}"
    [started] = running.named("service.started")
    assert (started["listen"], started["dashboard"]) == (url, f"{url}/dashboard")
    [stopping] = running.named("service.stopping")
    assert stopping["signal"] == "SIGTERM"


async def test_serve_with_workers_names_where_it_listens_once_and_per_worker(db, tmp_path):
    async with serving(db, tmp_path, "--workers", "2") as running:
        await until_logged(running, "service.started", 1)
    assert running.proc.returncode == 0
    url = f"http://127.0.0.1:{running.port}"
    [started] = running.named("service.started")
    assert (started["listen"], started["dashboard"], started["workers"]) == (
        url,
        f"{url}/dashboard",
        2,
    )
    workers = running.named("service.worker_started")
    assert {e["listen"] for e in workers} == {url}
    assert len({e["pid"] for e in workers}) == 2


async def test_service_started_is_said_once_every_worker_listens(db, tmp_path):
    """An operator (or a script) that waits for service.started finds the port served by
    every worker, not a parent that has only spawned them."""
    async with serving(db, tmp_path, "--workers", "2") as running:
        await until_logged(running, "service.started", 1, 60)
        workers = [c for c in psutil.Process(running.proc.pid).children() if "serve" in c.cmdline()]
        listening = [
            c
            for worker in workers
            for c in worker.net_connections(kind="tcp")
            if c.status == psutil.CONN_LISTEN and c.laddr.port == running.port
        ]
        assert len(listening) == 2, running.text()[-3000:]
    said = [e["event"] for e in running.events() if e["event"].startswith("service.")]
    assert said[:3] == ["service.worker_started"] * 2 + ["service.started"], said


EMIT = """
import logging, warnings
from service.logs import configure_logging
configure_logging({fmt!r}, "info")
try:
    raise ValueError("b'Authorization: Bearer {token}'")
except ValueError:
    logging.getLogger("aiohttp.server").exception(
        "Error handling request: %s", "GET /?client_secret={secret}&code={secret} Cookie: tg_session={secret}"
    )
logging.getLogger("asyncio").error("Task exception was never retrieved\\nfuture: <Task>")
warnings.warn("a warning, with its source line under it")
import structlog
structlog.get_logger().info("service.note", detail="Basic {basic}", password="{secret}")
"""


@pytest.mark.parametrize("fmt", ["json", "console"])
def test_library_records_and_tracebacks_are_one_redacted_line_each(fmt):
    token, secret = "tgat_" + "Q" * 49, "S3cr3t-" + "z" * 36
    basic_value = base64.b64encode(f"client:{secret}".encode()).decode()
    done = subprocess.run(
        [sys.executable, "-c", EMIT.format(fmt=fmt, token=token, secret=secret, basic=basic_value)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    lines = done.stderr.splitlines()
    assert len(lines) == 4, done.stderr  # four events, four lines: tracebacks included
    for secret_value in (token, secret, basic_value):
        assert not leaked(secret_value, done.stderr), done.stderr
    assert "[redacted]" in lines[0] and "ValueError" in lines[0]
    if fmt == "json":
        events = [json.loads(line) for line in lines]
        assert [e["level"] for e in events] == ["error", "error", "warning", "info"]
        assert events[0]["logger"] == "aiohttp.server"
        assert "Traceback (most recent call last)" in events[0]["exception"]
        assert events[3]["password"] == "[redacted]"


REQUEST_LINES = """
import structlog
from service import logs
logs.configure_logging("{fmt}", "info")
assert (logs._request_writer is not None) == ("{fmt}" == "json")  # the direct writer, or not
logs.request_id.set({request_id!r})  # as the request middleware does
for path in ({path!r}, "/oauth/token", "/api/v1/whoami", {path!r}):
    logs.request_line("GET", path, 401, 1.25, "192.0.2.7", {request_id!r})
    structlog.get_logger("service.web.middleware").info(
        "http.request", method="GET", path=path, status=401, ms=1.25, ip="192.0.2.7"
    )
"""


@pytest.mark.parametrize("fmt", ["json", "console"])
def test_the_request_line_is_what_the_structlog_pipeline_writes_redaction_included(fmt):
    """The request line skips structlog's processors when it can (it is the one event every
    request writes): same fields, same order, same redaction, as the pipeline writes."""
    token = "tgat_" + "R" * 49
    request_id = "tgrt_" + "i" * 20  # X-Request-Id is the client's to choose
    program = REQUEST_LINES.format(fmt=fmt, path=f"/api/v1/{token}", request_id=request_id)
    done = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, timeout=60, check=True
    )
    lines = done.stderr.splitlines()
    assert len(lines) == 8, done.stderr
    assert token not in done.stderr and request_id not in done.stderr, done.stderr
    if fmt != "json":
        return
    events = [json.loads(line) for line in lines]
    for fast, pipeline in zip(events[::2], events[1::2], strict=True):
        assert list(fast) == list(pipeline)  # the same keys in the same order
        assert fast.pop("timestamp") <= pipeline.pop("timestamp")
        assert fast == pipeline
    assert events[0]["path"] == "/api/v1/tgat_[redacted]"
    assert events[2]["path"] == "/oauth/token"
