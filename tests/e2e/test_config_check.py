"""`tollgate config check` shows the configuration every command reads, secrets masked;
a bad setting or file stops `serve` and every other command with one line naming it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

SMTP_PASSWORD = "smtp-pa55word-not-to-print"
DB_PASSWORD = "db-pa55word-not-to-print"
METRICS_TOKEN = "metrics-token-not-to-print-0123456789"
ROOT = Path(__file__).resolve().parents[2]


def tollgate(cwd: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """The command in a directory of its own (no .env of the checkout), with only the
    variables given, besides what Python needs."""
    keep = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG", "VIRTUAL_ENV")}
    return subprocess.run(
        [sys.executable, "-m", "service", *args],
        cwd=cwd,
        env={**keep, "PYTHONPATH": str(ROOT), **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_config_check_prints_the_effective_configuration_with_secrets_masked(tmp_path):
    done = tollgate(
        tmp_path, "config", "check",
        PORT="9000",
        DATABASE_URL=f"postgresql://tollgate:{DB_PASSWORD}@db.internal:5432/tollgate",
        SMTP_HOST="smtp.example.com", SMTP_USERNAME="alerts", SMTP_PASSWORD=SMTP_PASSWORD,
        METRICS_TOKEN=METRICS_TOKEN,
        PUBLIC_URL="https://auth.example.com/",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    shown = dict(line.split("=", 1) for line in done.stdout.splitlines())
    assert shown["PORT"] == "9000"
    assert shown["HOST"] == "127.0.0.1"  # a default, shown as well
    assert shown["DB_POOL_SIZE"] == "10"
    assert shown["SMTP_TLS"] == "starttls"
    assert shown["SMTP_PORT"] == "587"
    assert shown["PUBLIC_URL"] == "https://auth.example.com"
    assert shown["UPSTREAM_URL"] == ""
    assert shown["DATABASE_URL"] == "postgresql://tollgate:********@db.internal:5432/tollgate"
    assert shown["SMTP_PASSWORD"] == "********"
    assert shown["METRICS_TOKEN"] == "********"
    for secret in (SMTP_PASSWORD, DB_PASSWORD, METRICS_TOKEN):
        assert secret not in done.stdout


def test_config_check_names_every_problem_in_one_line_each_and_exits_2(tmp_path):
    done = tollgate(
        tmp_path, "config", "check",
        UPSTREAM_URL="ftp://x", PUBLIC_URL="auth.example.com",
        PERMISSIONS_FILE=str(tmp_path / "missing.json"), SMTP_PASSWORD=SMTP_PASSWORD,
    )  # fmt: skip
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.splitlines() == [
        "tollgate: SMTP_PASSWORD is set but SMTP_USERNAME is not",
        f"tollgate: PERMISSIONS_FILE {tmp_path / 'missing.json'}: cannot read: "
        "No such file or directory",
        "tollgate: UPSTREAM_URL must be an http:// or https:// URL with a host, got 'ftp://x'",
        "tollgate: PUBLIC_URL must be an http:// or https:// URL with a host, "
        "got 'auth.example.com'",
    ]


def test_a_bad_permissions_file_stops_serve_with_one_line(tmp_path):
    bad = tmp_path / "permissions.json"
    bad.write_text('{"invoices:read": 1}')
    done = tollgate(tmp_path, "serve", PERMISSIONS_FILE=str(bad), DATA_DIR=str(tmp_path))
    assert done.returncode == 2
    [line] = done.stderr.splitlines()
    assert line.startswith(f"tollgate: PERMISSIONS_FILE {bad}: Expected `str`, got `int`")


def test_a_bad_routes_file_stops_every_command_with_one_line(tmp_path):
    bad = tmp_path / "routes.json"
    bad.write_text("[{]")
    for command in (["serve", "--workers", "2"], ["projections", "status"], ["audit", "verify"]):
        done = tollgate(tmp_path, *command, ROUTES_FILE=str(bad), DATA_DIR=str(tmp_path))
        assert done.returncode == 2, command
        [line] = done.stderr.splitlines()
        assert line.startswith(f"tollgate: ROUTES_FILE {bad}: JSON is malformed"), command
    # refused before anything started: no embedded database was made under DATA_DIR
    assert not (tmp_path / "postgres").exists()


def test_an_upstream_that_is_not_http_stops_serve_before_it_answers_502(tmp_path):
    done = tollgate(tmp_path, "serve", UPSTREAM_URL="ftp://x", DATA_DIR=str(tmp_path))
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        "tollgate: UPSTREAM_URL must be an http:// or https:// URL with a host, got 'ftp://x'"
    ]


def test_every_password_of_the_database_url_is_masked(tmp_path):
    """The user's password, with a `/` or `?` left unencoded in it too, and the `password`
    and `sslpassword` parameters (an SSL key's passphrase)."""
    for url, secret in (
        ("postgresql://tg:db-pa55@db/x?sslpassword=ssl-pa55&password=qp-pa55", "pa55"),
        ("postgresql://u:s3c/ret-pa55@127.0.0.1/x", "pa55"),
        ("postgresql://u:s3c?ret-pa55@127.0.0.1/x", "pa55"),
    ):
        done = tollgate(tmp_path, "config", "check", DATABASE_URL=url)
        assert done.returncode == 0, done.stderr
        [shown] = [line for line in done.stdout.splitlines() if line.startswith("DATABASE_URL=")]
        assert secret not in shown and "********" in shown, shown
        assert "s3c" not in shown and "ret" not in shown, shown


def test_a_database_url_the_driver_cannot_read_is_refused_without_quoting_its_password(tmp_path):
    """A `/` left unencoded in the password makes the driver read a piece of it as the port,
    and say so: the line names the problem, not the piece."""
    done = tollgate(tmp_path, "audit", "verify", DATABASE_URL="postgresql://u:s3c/ret@127.0.0.1/x")
    assert done.returncode == 2
    [line] = done.stderr.splitlines()
    assert line.startswith("tollgate: DATABASE_URL: not a URL the driver reads")
    assert "s3c" not in line and "ret" not in line
    plain = tollgate(tmp_path, "audit", "verify", DATABASE_URL="postgresql://127.0.0.1:port/x")
    assert plain.returncode == 2
    assert "port" in plain.stderr  # no password: the driver's own words


def test_the_configuration_config_check_prints_reads_back(tmp_path):
    """Its lines are VARIABLE=value as a .env file holds them: written to one, every
    command reads them (a timeout printed 5.0 was refused: it must be an integer)."""
    shown = tollgate(tmp_path, "config", "check", DATA_DIR=str(tmp_path / "data"))
    assert shown.returncode == 0, shown.stderr
    assert "DB_TIMEOUT=5\n" in shown.stdout and "READY_MAX_LAG=60\n" in shown.stdout
    (tmp_path / ".env").write_text(shown.stdout)
    again = tollgate(tmp_path, "config", "check")
    assert again.returncode == 0, again.stderr
    assert again.stdout == shown.stdout
