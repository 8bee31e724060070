"""node-oidc-provider, the peer the token endpoint is measured against in the same run.

The issue that set the token endpoint's targets compared it with node-oidc-provider's
client_credentials issuance (its quick-start in-memory adapter: nothing durable). A figure
from another day on this shared machine compares nothing, so `make bench` installs the
peer (`peer/package.json`, pinned by its lock file, from the npm registry) into a
temporary directory and drives it with the same wrk request as Tollgate.

Two releases: 9.x is current but names Node.js 22 as its runtime; 8.8.1 is the last release
made for Node.js 20, which is what Debian's and this machine's Node.js is.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

HERE = Path(__file__).parent / "peer"
#: the releases measured: (npm alias in package.json, version)
RELEASES = (("oidc-provider-9", "9.13.3"), ("oidc-provider-8", "8.8.1"))
CLIENT_ID = "bench"
CLIENT_SECRET = "bench-secret-for-node-oidc-provider-0123456789"


@contextmanager
def installed() -> Iterator[Path | None]:
    """A directory with the peer installed (`npm ci`), or None, having said why not."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        print("\n(node-oidc-provider not measured: node and npm are not on PATH)")
        yield None
        return
    with tempfile.TemporaryDirectory(prefix="tollgate-bench-peer-") as tmp:
        root = Path(tmp)
        for name in ("package.json", "package-lock.json", "server.mjs"):
            shutil.copy(HERE / name, root / name)
        done = subprocess.run(
            [npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"],
            cwd=root, capture_output=True, text=True, timeout=300, check=False,
        )  # fmt: skip
        if done.returncode != 0:
            print(f"\n(node-oidc-provider not measured: npm ci failed: {done.stderr[-300:]})")
            yield None
            return
        yield root


def argv(root: Path, package: str, port: int, workers: int) -> list[str]:
    return [
        "node", str(root / "server.mjs"), package, str(port), str(workers), CLIENT_ID,
        CLIENT_SECRET,
    ]  # fmt: skip
