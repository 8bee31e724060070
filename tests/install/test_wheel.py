"""The wheel, as `pip install` gives it: built from a fresh copy, installed (not editable)
into a clean virtualenv outside the checkout, it serves on the embedded database, and the
README's first walk through works against it."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import tomllib
import urllib.request
import zipfile
from pathlib import Path

import pytest

from tests.install.support import (
    ROOT,
    call,
    clean_env,
    ctrl_c,
    free_port,
    fresh_copy,
    wait_healthy,
)

pytestmark = [pytest.mark.install, pytest.mark.timeout(600)]


def build_wheel(tmp_path: Path) -> Path:
    source = fresh_copy(tmp_path / "source")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", "dist", "."],
        cwd=source,
        check=True,
    )
    [wheel] = (source / "dist").glob("tollgate-*.whl")
    return wheel


def install(wheel: Path, venv: Path) -> Path:
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", str(wheel)],
        check=True,
        env=clean_env(),
    )
    return venv / "bin"


def test_the_wheel_ships_every_package_and_the_schema(tmp_path: Path) -> None:
    with zipfile.ZipFile(build_wheel(tmp_path)) as wheel:
        names = wheel.namelist()
        for module in ("app.py", "web/__init__.py", "oauth/__init__.py", "domain/__init__.py"):
            assert f"service/{module}" in names
        assert "projections/runner.py" in names
        assert not [n for n in names if n.startswith("tests/")]
        # the real content of the top-level schema.sql, not a link to it
        assert wheel.read("service/schema.sql") == (ROOT / "schema.sql").read_bytes()


# Every dashboard template, loaded and compiled from the installed package.
DASHBOARD_TEMPLATES = """
from service.web.dashboard.base import templates
env = templates().environment
names = [n for n in env.list_templates() if n.startswith("dashboard/") and n.endswith(".html")]
for name in names:
    env.get_template(name)
print(len(names))
"""


def test_the_installed_wheel_serves_and_issues_a_token(tmp_path: Path) -> None:
    bin_dir = install(build_wheel(tmp_path), tmp_path / "venv")
    home = tmp_path / "home"  # the working directory: no checkout, no .env around
    home.mkdir()
    port = free_port()
    env = clean_env(DATA_DIR=str(tmp_path / "data"), PORT=str(port))

    where = subprocess.run(
        [bin_dir / "python", "-c", "import service.app, service; print(service.__file__)"],
        cwd=home, env=env, capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert where.startswith(str(tmp_path / "venv" / "lib"))  # installed, not the checkout

    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    shown = subprocess.run(
        [bin_dir / "tollgate", "--version"], cwd=home, env=env, capture_output=True, text=True
    )
    assert shown.stdout.strip() == f"tollgate {version}"

    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        serve = subprocess.Popen(
            [bin_dir / "tollgate", "serve"], cwd=home, env=env, stdout=out, stderr=out,
            start_new_session=True,
        )  # fmt: skip
    try:
        wait_healthy(port, serve, log, seconds=120)
        token = first_walk_through(bin_dir, home, env, f"http://127.0.0.1:{port}")
        status, whoami = call(
            "GET", f"http://127.0.0.1:{port}/api/v1/whoami",
            headers={"Authorization": f"Bearer {token}"},
        )  # fmt: skip
        assert status == 200 and whoami["permissions"] == ["invoices:read"]
        # the files the pages read are in the wheel, not the checkout
        for path, expected in (("/dashboard", "<form"), ("/openapi.json", '"openapi"')):
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=30) as page:
                assert page.status == 200 and expected in page.read().decode(), path
        compiled = subprocess.run(
            [bin_dir / "python", "-c", DASHBOARD_TEMPLATES], cwd=home, env=env,
            capture_output=True, text=True,
        )  # fmt: skip
        assert compiled.returncode == 0, compiled.stderr
        assert int(compiled.stdout) >= 10  # every dashboard page's template
    finally:
        text = ctrl_c(serve, log)
    assert "embedded_postgres.stopped" in text
    assert "Traceback" not in text


def first_walk_through(bin_dir: Path, home: Path, env: dict[str, str], base: str) -> str:
    """The README's: a company from the command line, an application over the admin API,
    a client_credentials token; returns the access token."""
    made = subprocess.run(
        [bin_dir / "tollgate", "company", "create", "Acme", "--admin-email", "admin@acme.example"],
        cwd=home, env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    admin_key = json.loads(made.stdout)["admin_key"]

    application = {
        "name": "Billing sync",
        "grant_type": "client_credentials",
        "ip_allowlist": ["127.0.0.1"],
        "permissions": ["invoices:read"],
        "notification_emails": ["ops@acme.example"],
    }
    status, created = call(
        "POST", f"{base}/admin/applications", json.dumps(application).encode(),
        {"Authorization": f"Bearer {admin_key}", "Content-Type": "application/json"},
    )  # fmt: skip
    assert status == 201, created
    basic = base64.b64encode(f"{created['client_id']}:{created['client_secret']}".encode())
    status, token = call(
        "POST", f"{base}/oauth/token", b"grant_type=client_credentials",
        {"Authorization": f"Basic {basic.decode()}",
         "Content-Type": "application/x-www-form-urlencoded"},
    )  # fmt: skip
    assert status == 200, token
    assert token["token_type"] == "Bearer"
    assert token["scope"] == "invoices:read"
    return str(token["access_token"])
