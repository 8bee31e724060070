"""HTTP load from wrk, a C load generator (Debian's `wrk`), as peers measure: a Python
driver on the same two cores caps the bare baselines it is compared with."""

from __future__ import annotations

import contextlib
import re
import resource
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import psutil

from tests.bench.load import RequestSpec, Result

THREADS = 2
SECONDS = 10

# wrk's Lua API: every request the same; the answers that are not 2xx/3xx counted by wrk.
_SCRIPT = """
wrk.method = {method}
wrk.body = {body}
{headers}
"""


def available() -> bool:
    return shutil.which("wrk") is not None


def _lua(text: str) -> str:
    return "[==[" + text + "]==]"


def script(spec: RequestSpec) -> str:
    method, _path, headers, body = spec
    # A space after "[": "[[" would open a Lua long string, and wrk would refuse the script.
    lines = "\n".join(f"wrk.headers[ {_lua(k)} ] = {_lua(v)}" for k, v in headers.items())
    return _SCRIPT.format(
        method=_lua(method), body=_lua(body.decode()) if body else "nil", headers=lines
    )


class CpuMeter:
    """Where the machine's CPU went while wrk measured: the server measured (every process
    this one started, but wrk), PostgreSQL (the postmaster of `postgres_pid` and its
    backends, when the server is on this machine) and wrk itself, each as a share of one
    core. On a machine with few cores the three compete, and the shares say what bounds a
    figure."""

    def __init__(self, postgres_pid: int | None) -> None:
        self._postgres = psutil.Process(postgres_pid) if postgres_pid is not None else None
        self.shares: dict[str, float | None] = {}

    def _trees(self) -> tuple[float, float]:
        server = [c for c in psutil.Process().children(recursive=True) if not _is_wrk(c)]
        postgres = 0.0
        if self._postgres is not None:
            postgres = self._sum([self._postgres, *self._postgres.children(recursive=True)])
            # A backend that exits within the window takes its CPU time out of the live
            # processes' sum (a share once read -2%): the postmaster reaps it, so its time
            # is counted there, as the postmaster's children's.
            with contextlib.suppress(psutil.Error):
                reaped = self._postgres.cpu_times()
                postgres += reaped.children_user + reaped.children_system
        # The servers measured here live through the window.
        return self._sum(server), postgres

    def _sum(self, procs: list[psutil.Process]) -> float:
        total = 0.0
        for proc in procs:
            try:
                times = proc.cpu_times()
            except psutil.Error:
                continue
            total += times.user + times.system
        return total

    def __enter__(self) -> CpuMeter:
        self._started = time.perf_counter()
        self._server, self._pg = self._trees()
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        self._wrk = children.ru_utime + children.ru_stime
        return self

    def __exit__(self, *_exc: object) -> None:
        elapsed = time.perf_counter() - self._started
        server, pg = self._trees()
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        wrk = children.ru_utime + children.ru_stime - self._wrk  # wrk has exited: counted
        self.shares = {
            "server": (server - self._server) / elapsed,
            "postgres": (pg - self._pg) / elapsed if self._postgres is not None else None,
            "wrk": wrk / elapsed,
        }


def _is_wrk(proc: psutil.Process) -> bool:
    try:
        return proc.name() == "wrk"
    except psutil.Error:  # gone since it was listed: its CPU time with it
        return True


def postgres_pid(data_directory: str) -> int | None:
    """The postmaster's pid from its data directory, when that is on this machine."""
    try:
        return int((Path(data_directory) / "postmaster.pid").read_text().split("\n", 1)[0])
    except (OSError, ValueError):
        return None


def measure(
    base: str,
    spec: RequestSpec,
    *,
    connections: int = 64,
    threads: int = THREADS,
    seconds: int = SECONDS,
    cpu: CpuMeter | None = None,
) -> Result:
    """Drive `base + path` with wrk for `seconds` after a short warm-up run; `cpu`, when
    given, measures the measured run alone."""
    with tempfile.TemporaryDirectory() as tmp:
        lua = Path(tmp) / "request.lua"
        lua.write_text(script(spec))
        url = base + spec[1]
        argv = ["wrk", f"-t{threads}", f"-c{connections}", "--latency", "-s", str(lua)]
        subprocess.run([*argv, "-d2s", url], check=True, capture_output=True, timeout=60)
        with cpu or contextlib.nullcontext():
            done = subprocess.run(
                [*argv, f"-d{seconds}s", url], check=True, capture_output=True, text=True,
                timeout=seconds + 60,
            )  # fmt: skip
    if done.stderr.strip():
        # wrk runs on without a script it cannot load (exit status 0): not a measurement.
        raise RuntimeError(f"wrk: {done.stderr.strip()}")
    return parse(done.stdout, seconds)


class Background:
    """wrk driving `spec` for `seconds` while something else is measured; `result()` waits
    for it to finish and reads what it printed."""

    def __init__(self, base: str, spec: RequestSpec, seconds: int, connections: int = 16) -> None:
        self._dir = tempfile.TemporaryDirectory()
        lua = Path(self._dir.name) / "request.lua"
        lua.write_text(script(spec))
        argv = ["wrk", "-t1", f"-c{connections}", "--latency", "-s", str(lua), f"-d{seconds}s"]
        self.seconds = seconds
        self._proc = subprocess.Popen(
            [*argv, base + spec[1]], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )

    def result(self) -> Result:
        out, err = self._proc.communicate(timeout=self.seconds + 60)
        self._dir.cleanup()
        if err.strip():
            raise RuntimeError(f"wrk: {err.strip()}")
        return parse(out, self.seconds)


_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0}


def _ms(value: str) -> float:
    number, unit = re.fullmatch(r"([\d.]+)(us|ms|s)", value).groups()  # type: ignore[union-attr]
    return float(number) * _UNITS[unit]


def parse(output: str, seconds: float) -> Result:
    """What wrk printed: requests completed, non-2xx/3xx answers and socket errors, the
    latency distribution (--latency)."""
    requests = int(re.search(r"(\d+) requests in", output).group(1))  # type: ignore[union-attr]
    duration = re.search(r"requests in ([\d.]+)(us|ms|s|m)", output)
    elapsed = seconds
    if duration is not None:
        amount, unit = float(duration.group(1)), duration.group(2)
        elapsed = amount * {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}[unit]
    errors = 0
    if (bad := re.search(r"Non-2xx or 3xx responses: (\d+)", output)) is not None:
        errors += int(bad.group(1))
    if (socket := re.search(r"Socket errors: (.*)", output)) is not None:
        errors += sum(int(n) for n in re.findall(r"\d+", socket.group(1)))
    p50 = _ms(re.search(r"^\s+50%\s+(\S+)", output, re.M).group(1))  # type: ignore[union-attr]
    p99 = _ms(re.search(r"^\s+99%\s+(\S+)", output, re.M).group(1))  # type: ignore[union-attr]
    return Result(requests - errors, errors, elapsed, p50, p99)
