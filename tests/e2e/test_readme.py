"""README.md's "A first walk through", pasted into bash block by block against a service
that its own first block starts: a step that stops working fails here, not for a newcomer.

What the test changes in the text, and why that keeps it honest: only where the service
listens (`127.0.0.1:8080` becomes a free port) and where state lands (`.data/` and
`tollgate.log` go to a temporary directory, and DATA_DIR/PORT in the environment say the
same to `make run` and `tollgate`). Every command, flag, JSON field and parse runs as
written, and each substitution must hit (a README that moved to another port or folder
fails here instead of quietly talking to a developer's own service on 8080). Two more
stand-ins, both for what a person does outside the shell: the block marked
`# in a browser` is not run; the test signs in and presses Allow over HTTP, as a browser
submits those forms, and sets `CALLBACK` to the address the browser would show. And when
the shared virtualenv's install stamp is stale, `make run` runs as `make -o install run`
(the same `tollgate serve`, without re-installing under other running tests); after
`make test` or `make install` the stamp is fresh and `make run` runs as written.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import secrets
import shlex
import signal
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

from service.storage.embedded import EmbeddedPostgres
from tests.e2e.oauth_helpers import consent, query_of, sign_in

ROOT = Path(__file__).resolve().parents[2]
SECTION = "## A first walk through"
BROWSER = "# in a browser"
BLOCK_SECONDS = 60
START_SECONDS = 180  # the first block: `make run`, initdb, the service


def walk_through() -> list[str]:
    """The ```sh blocks of the walk-through section, in order."""
    text = (ROOT / "README.md").read_text()
    start = text.index(SECTION)
    end = text.find("\n## ", start + len(SECTION))
    section = text[start : end if end != -1 else None]
    return re.findall(r"^```sh\n(.*?)^```$", section, flags=re.S | re.M)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def install_is_fresh() -> bool:
    """`make -q install`: 0 when `make run` would not re-install first."""
    probe = subprocess.run(
        ["make", "--no-print-directory", "-q", "-C", str(ROOT), "install"],
        capture_output=True,
        timeout=30,
    )
    return probe.returncode == 0


@dataclass
class Isolated:
    port: int
    state: Path  # DATA_DIR
    log: Path  # stands for ./tollgate.log

    def substitute(self, blocks: list[str]) -> list[str]:
        text = "\n\x00\n".join(blocks)  # one string: a substitution that hits nothing shows
        for old, new in [
            ("127.0.0.1:8080", f"127.0.0.1:{self.port}"),
            (".data/", f"{self.state}/"),
            ("tollgate.log", str(self.log)),
        ]:
            assert old in text, f"the walk-through no longer mentions {old!r}: update this test"
            text = text.replace(old, new)
        assert "8080" not in text, "a port the substitution missed"
        if not install_is_fresh():
            text = text.replace("make run", "make -o install run")
        return text.split("\n\x00\n")


class Shell:
    """One bash, fed block after block as a person pastes them. `set -m` gives it the job
    control of an interactive shell (`kill %1` signals the job's process group); `-eu`
    makes a failing command or an unset variable end it, so a broken step cannot pass
    unnoticed further down."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process

    @classmethod
    async def start(cls, env: dict[str, str]) -> Shell:
        process = await asyncio.create_subprocess_exec(
            "bash", "--noprofile", "--norc",
            cwd=ROOT, env=env, start_new_session=True,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        shell = cls(process)
        await shell.run("set -eu -o pipefail; set -m")
        return shell

    async def run(self, block: str, seconds: float = BLOCK_SECONDS) -> str:
        """Run a block; its output (stdout and stderr). Fails when the shell stops, or
        when the block has not finished within `seconds`."""
        assert self.process.stdin is not None and self.process.stdout is not None
        marker = f"__block_done_{secrets.token_hex(8)}__"
        # The block arrives whole, as a paste does; its commands read /dev/null, not the
        # rest of what the test feeds the shell.
        self.process.stdin.write(f"eval {shlex.quote(block)} < /dev/null\necho {marker}\n".encode())
        await self.process.stdin.drain()
        lines: list[str] = []
        try:
            async with asyncio.timeout(seconds):
                while raw := await self.process.stdout.readline():
                    line = raw.decode(errors="replace")
                    if line.rstrip("\n") == marker:
                        return "".join(lines)
                    lines.append(line)
        except TimeoutError:
            raise AssertionError(
                f"not done after {seconds} s:\n{block}\n--- output:\n{''.join(lines)}"
            ) from None
        raise AssertionError(f"the shell stopped in:\n{block}\n--- output:\n{''.join(lines)}")

    async def stop(self) -> None:
        """Whatever is left of the shell and its jobs (after a failed step): SIGTERM, so the
        service stops the database it started, then SIGKILL for what did not go."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in _session_members(self.process.pid):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, sig)
            for _ in range(300):
                if not _session_members(self.process.pid):
                    return
                await asyncio.sleep(0.1)


def _session_members(sid: int) -> list[int]:
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # after "pid (comm)": state, ppid, pgrp, session; a zombie is gone but for its entry
        if int(fields[3]) == sid and fields[0] != "Z":
            members.append(int(stat.parent.name))
    return members


async def browser_consent(port: int, printed: str, email: str, password: str) -> str:
    """Sign in and press Allow as a browser submits those forms; the callback address."""
    url = re.search(r"http://127\.0\.0\.1:\d+(/oauth/authorize\?\S+)", printed)
    assert url, printed
    jar = aiohttp.CookieJar(unsafe=True)  # cookies for an IP address, as browsers keep them
    async with aiohttp.ClientSession(f"http://127.0.0.1:{port}", cookie_jar=jar) as browser:
        await sign_in(browser, email, password, url.group(1))
        location = await consent(browser, url.group(1))
    assert location.startswith("http://127.0.0.1:9000/callback?"), location
    return location


def printed_value(output: str, field: str) -> str:
    found = re.search(rf'"{field}":\s*"([^"]+)"', output)
    assert found, f"no {field} in:\n{output}"
    return found.group(1)


# The promises the README makes, by the block that makes them.
PROMISES = {
    "company create": [r'"admin_password":\s*"', r'"admin_key":\s*"tgadm_'],
    '"grant_type": "client_credentials"': [r'"client_secret":\s*"'],
    "TOKEN=$(curl": [
        r'"token_type":\s*"Bearer"',
        r'"client_id":\s*"',  # whoami answered
    ],
    "--interface 127.0.0.2": [
        r'"error":\s*"ip_not_allowed"[^\n]*\} 403\n',
        r'"error":\s*"invalid_token"[^\n]*\} 401\n',
        r"violation-\d+\.eml",
        r"To: ops@acme\.example",
        r"127\.0\.0\.2",
    ],
    "rotate-secret": [
        r'"error":\s*"invalid_client"[^\n]*\} 401\n',
        r'"access_token":\s*"tgat_[^"]+"[^\n]*\} 200\n',
    ],
    '"grant_type": "authorization_code"': [r'"redirect_uri":\s*"http://127\.0\.0\.1:9000/'],
    "code_challenge": [r"/oauth/authorize\?"],
    "grant_type=authorization_code": [
        r"state matches",
        r'"expires_in":\s*7200',
        r'"refresh_token":\s*"tgrt_',
        r'"permissions":\s*\["invoices:read"\]',
    ],
    "grant_type=refresh_token": [r'"refresh_token":\s*"tgrt_', r'"access_token":\s*"tgat_'],
}


def output_of(blocks: list[str], outputs: dict[int, str], snippet: str) -> str:
    """The output of the first block (already run) whose text has `snippet`."""
    found = [i for i, block in enumerate(blocks) if snippet in block and i in outputs]
    assert found, f"no walk-through block has {snippet!r} (before this step) any more"
    return outputs[found[0]]


def check_promises(blocks: list[str], outputs: dict[int, str]) -> None:
    for snippet, patterns in PROMISES.items():
        output = output_of(blocks, outputs, snippet)
        for pattern in patterns:
            assert re.search(pattern, output), (
                f"{pattern!r} not in the output of the block with {snippet!r}:\n{output}"
            )


@pytest.mark.timeout(600)
async def test_the_readme_walk_through_works_when_pasted(tmp_path):
    isolated = Isolated(free_port(), tmp_path / "data", tmp_path / "tollgate.log")
    blocks = isolated.substitute(walk_through())
    assert any(b.startswith(BROWSER) for b in blocks), "the browser step is not marked"
    assert blocks[-1].strip().startswith("kill %1"), "the walk-through ends by stopping it"
    # a developer's own database, mail server or public name must not leak into the run
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in {"DATABASE_URL", "MAKEFLAGS", "MAKELEVEL", "PUBLIC_URL"}
        and not k.startswith("SMTP_")
    }
    env |= {"DATA_DIR": str(isolated.state), "PORT": str(isolated.port)}
    shell = await Shell.start(env)
    outputs: dict[int, str] = {}
    callback = ""
    try:
        for i, block in enumerate(blocks):
            if block.startswith(BROWSER):
                company = output_of(blocks, outputs, "company create")
                callback = await browser_consent(
                    isolated.port,
                    output_of(blocks, outputs, "code_challenge"),
                    email=printed_value(company, "admin_email"),
                    password=printed_value(company, "admin_password"),
                )
                outputs[i] = await shell.run(f"CALLBACK={shlex.quote(callback)}")
                continue
            if "make run" in block:
                outputs[i] = await shell.run(block, START_SECONDS)
                await answers_ready(isolated.port)  # the block waited for it, as it says
                continue
            outputs[i] = await shell.run(block)
        check_promises(blocks, outputs)
        assert list((isolated.state / "mail").glob("violation-*.eml"))
        stopped(isolated)
        service_log = isolated.log.read_text()
    finally:
        await shell.stop()
        _stop_database(isolated.state / "postgres")
    assert "Traceback" not in service_log
    # what the walk-through showed on the terminal, the service never wrote to its log
    shown = "".join(outputs.values())
    secrets_shown = [query_of(callback)["code"]] + [
        value
        for field in (
            "admin_password",
            "admin_key",
            "client_secret",
            "access_token",
            "refresh_token",
        )
        for value in re.findall(rf'"{field}":\s*"([^"]+)"', shown)
    ]
    assert secrets_shown and not any(value in service_log for value in secrets_shown)


async def answers_ready(port: int) -> None:
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"http://127.0.0.1:{port}/readyz") as response,
    ):
        assert response.status == 200, await response.text()


def stopped(isolated: Isolated) -> None:
    """After `kill %1; wait`: nothing listens on the port, and the PostgreSQL the service
    started is down (its postmaster.pid is gone)."""
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", isolated.port), timeout=2).close()
    assert not (isolated.state / "postgres" / "postmaster.pid").exists()


def _stop_database(pgdata: Path) -> None:
    """A run that failed half-way may leave the embedded server up (it has a session of
    its own, so killing the shell's does not reach it)."""
    if (pgdata / "postmaster.pid").exists():
        server = EmbeddedPostgres(pgdata)
        server.start()  # joins it: the last user out stops it, and the killed ones are gone
        server.stop()
