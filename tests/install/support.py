"""What the install checks share: a fresh copy of the checkout, a free port, a service to
wait for and stop, and the state above a folder that must not change."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]


def fresh_copy(dest: Path) -> Path:
    """The checkout as a fresh clone with the uncommitted work on top: git-tracked files and
    untracked ones that are not ignored (no .venv, no .data, no build output)."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.decode()
    for name in filter(None, listed.split("\0")):
        source = ROOT / name
        if not source.is_symlink() and not source.exists():
            continue  # deleted in the work tree, not yet in a commit
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target, follow_symlinks=False)  # service/schema.sql stays a link
    return dest


def clean_env(**extra: str) -> dict[str, str]:
    """The environment of a newcomer's shell: no database, virtualenv or make of ours."""
    unwanted = {"DATABASE_URL", "TEST_DATABASE_URL", "MAKEFLAGS", "MFLAGS", "MAKELEVEL"}
    unwanted |= {"VIRTUAL_ENV", "PYTHONPATH", "PYTEST_ADDOPTS", "PYTEST_CURRENT_TEST"}
    env = {k: v for k, v in os.environ.items() if k not in unwanted}
    venv_bin = str(ROOT / ".venv" / "bin")
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if p != venv_bin)
    env.update(LOG_FORMAT="json", **extra)
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_healthy(port: int, proc: subprocess.Popen[bytes], log: Path, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()[-3000:]
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as r:
                assert json.load(r) == {"status": "ok"}
                return
        except (urllib.error.URLError, ConnectionError):
            time.sleep(0.2)
    raise AssertionError(f"no /healthz within {seconds} s:\n{log.read_text()[-3000:]}")


def ctrl_c(proc: subprocess.Popen[bytes], log: Path) -> str:
    """Press Ctrl-C on the process group, as a terminal does; the log once all exited."""
    if proc.poll() is not None:  # it stopped by itself: what failed says why
        return log.read_text()
    os.killpg(proc.pid, signal.SIGINT)
    code = proc.wait(60)
    text = log.read_text()
    assert code in (0, -signal.SIGINT), text[-3000:]
    return text


def call(
    method: str, url: str, body: bytes | None = None, headers: dict[str, str] | None = None
) -> tuple[int, Any]:
    request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as exc:
        return exc.code, json.load(exc)


def folders_above(path: Path) -> dict[str, tuple[int, int, int]]:
    """Mode and owner of every folder above `path`."""
    return {str(p): (p.stat().st_mode, p.stat().st_uid, p.stat().st_gid) for p in path.parents}


def accounts() -> list[tuple[str, int]]:
    return sorted((entry.pw_name, entry.pw_uid) for entry in pwd.getpwall())
