"""Settings are checked when loaded: every problem at once, each one line naming its
variable, before anything starts (a gateway that answers 502 to every call, metadata
with an issuer that is not a URL, a traceback from a bad file)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from service.settings import ConfigError, load_settings


def problems(env: dict[str, str]) -> list[str]:
    with pytest.raises(ConfigError) as refused:
        load_settings(env, dotenv=False)
    lines = list(refused.value.problems)
    assert str(refused.value).splitlines() == lines
    assert all("\n" not in line and "Traceback" not in line for line in lines)
    return lines


@pytest.mark.parametrize(
    ("name", "value", "words"),
    [
        ("UPSTREAM_URL", "ftp://x", "UPSTREAM_URL must be an http:// or https:// URL with a host"),
        ("UPSTREAM_URL", "api.internal:8000", "UPSTREAM_URL must be an http:// or https://"),
        ("UPSTREAM_URL", "http://", "UPSTREAM_URL must be an http:// or https:// URL with a host"),
        ("UPSTREAM_URL", "http://api:eighty", "UPSTREAM_URL is not a URL"),
        ("UPSTREAM_URL", "http://api/v1?key=1", "UPSTREAM_URL must have no query or fragment"),
        ("PUBLIC_URL", "auth.example.com", "PUBLIC_URL must be an http:// or https:// URL"),
        ("PUBLIC_URL", "https://auth.example.com/#top", "PUBLIC_URL must have no query"),
        ("PUBLIC_URL", "https://auth.example .com", "PUBLIC_URL must be an http:// or https://"),
        ("PUBLIC_URL", "https://u:p@auth.example.com", "PUBLIC_URL must not hold a user"),
        ("DATABASE_URL", "mysql://u:pw@db/x", "DATABASE_URL must be postgresql://"),
        ("MAIL_FROM", "tollgate", "MAIL_FROM must be an email address"),
        ("RUN_PROJECTIONS", "maybe", "RUN_PROJECTIONS must be true or false"),
        ("LOG_FORMAT", "xml", "LOG_FORMAT must be console or json"),
    ],
)
def test_a_bad_value_is_one_line_naming_its_variable(name, value, words):
    [line] = problems({name: value})
    assert line.startswith(words), line


def test_good_urls_load_without_a_trailing_slash():
    settings = load_settings(
        {"UPSTREAM_URL": "http://10.0.0.5:8000/base/", "PUBLIC_URL": "https://auth.example.com/"},
        dotenv=False,
    )
    assert settings.upstream_url == "http://10.0.0.5:8000/base"
    assert settings.public_url == "https://auth.example.com"
    assert settings.issuer == "https://auth.example.com"


def test_a_url_is_kept_with_its_scheme_and_host_in_lower_case():
    """The issuer is compared as a string, and "HTTPS://" dropped the cookies' Secure flag."""
    settings = load_settings(
        {"PUBLIC_URL": "HTTPS://Auth.Example.com:8443/Base/", "UPSTREAM_URL": "HTTP://API:8000"},
        dotenv=False,
    )
    assert settings.issuer == "https://auth.example.com:8443/Base"
    assert settings.upstream_url == "http://api:8000"


def test_a_password_in_a_refused_url_is_not_repeated():
    [line] = problems({"UPSTREAM_URL": "ftp://svc:hunter2-secret@api.internal"})
    assert "hunter2-secret" not in line
    [line] = problems({"DATABASE_URL": "mysql://svc:hunter2-secret@db/x"})
    assert "hunter2-secret" not in line


def test_every_problem_is_reported_at_once():
    lines = problems(
        {"PORT": "0", "UPSTREAM_URL": "ftp://x", "PUBLIC_URL": "auth", "LOG_LEVEL": "loud"}
    )
    assert [line.split(" ", 1)[0] for line in lines] == [
        "PORT",
        "UPSTREAM_URL",
        "PUBLIC_URL",
        "LOG_LEVEL",
    ]


def test_a_missing_permissions_file_is_one_line(tmp_path):
    [line] = problems({"PERMISSIONS_FILE": str(tmp_path / "nope.json")})
    assert (
        line == f"PERMISSIONS_FILE {tmp_path / 'nope.json'}: cannot read: No such file or directory"
    )


@pytest.mark.parametrize(
    ("content", "words"),
    [
        ("{not json", "JSON is malformed"),
        ('{"Invoices": "x"}', "names must look like 'invoices:read'"),
        ("[]", "Expected `object`"),
    ],
)
def test_a_bad_permissions_file_is_one_line(tmp_path, content, words):
    path = tmp_path / "permissions.json"
    path.write_text(content)
    [line] = problems({"PERMISSIONS_FILE": str(path)})
    assert line.startswith(f"PERMISSIONS_FILE {path}: ")
    assert words in line


def test_a_routes_file_naming_an_unknown_permission_is_one_line(tmp_path):
    path = tmp_path / "routes.json"
    path.write_text(json.dumps([{"prefix": "/api/v1/ledgers", "permission": "ledgers:read"}]))
    [line] = problems({"ROUTES_FILE": str(path)})
    assert line.startswith(f"ROUTES_FILE {path}: ")
    assert "ledgers:read" in line


@pytest.mark.parametrize(
    "rules",
    [
        # a public rule before a permission's: the file's order decided, silently
        [
            {"prefix": "/api/v1/x", "public": True},
            {"prefix": "/api/v1/x", "permission": "invoices:write"},
        ],
        [
            {"prefix": "/api/v1/x", "permission": "invoices:read", "methods": ["GET", "POST"]},
            {"prefix": "/api/v1/X/", "public": True, "methods": ["POST"]},
        ],
    ],
    ids=["same-prefix", "case-and-slash"],
)
def test_two_rules_for_one_prefix_and_method_are_refused(tmp_path, rules):
    path = tmp_path / "routes.json"
    path.write_text(json.dumps(rules))
    [line] = problems({"ROUTES_FILE": str(path)})
    assert line.startswith(f"ROUTES_FILE {path}: ")
    assert "POST" in line and "one rule per prefix and method" in line


def test_rules_for_one_prefix_and_other_methods_are_taken(tmp_path):
    path = tmp_path / "routes.json"
    path.write_text(json.dumps([
        {"prefix": "/api/v1/x", "permission": "invoices:read", "methods": ["GET"]},
        {"prefix": "/api/v1/x/", "permission": "invoices:write", "methods": ["POST"]},
    ]))  # fmt: skip
    assert load_settings({"ROUTES_FILE": str(path)}, dotenv=False).routes_file == path


def test_a_routes_file_that_is_a_directory_is_one_line(tmp_path):
    [line] = problems({"ROUTES_FILE": str(tmp_path)})
    assert line == f"ROUTES_FILE {tmp_path}: cannot read: Is a directory"


def test_a_data_dir_that_is_a_file_is_refused(tmp_path):
    path = tmp_path / "data"
    path.write_text("")
    [line] = problems({"DATA_DIR": str(path)})
    assert line == f"DATA_DIR {str(path)!r} is not a directory"


def test_a_data_dir_that_cannot_be_written_is_refused(tmp_path):
    """Taken at start, it failed at the first violation's email, as an SMTP failure."""
    [line] = problems({"DATA_DIR": "/proc/tollgate"})
    assert line == (
        "DATA_DIR '/proc/tollgate' is not a folder this user can write in "
        "(nor can it be made in '/proc')"
    )
    # nothing is written there with both a database and a mail server elsewhere
    elsewhere = {"DATABASE_URL": "postgresql://tollgate@db.internal/tollgate",
                 "SMTP_HOST": "mail.internal"}  # fmt: skip
    read_only = load_settings({"DATA_DIR": "/proc/tollgate", **elsewhere}, dotenv=False)
    assert read_only.data_dir == Path("/proc/tollgate")
    fresh = tmp_path / "not" / "yet"
    assert load_settings({"DATA_DIR": str(fresh)}, dotenv=False).data_dir == fresh
    assert not (tmp_path / "not").exists()  # checked, not made
    assert list(tmp_path.iterdir()) == []


def test_a_bound_that_ran_out_is_a_line_that_says_so(capsys):
    """TimeoutError has no message: the line still says what happened."""
    from service.cli import _one_line

    def stalled() -> int:
        raise TimeoutError

    assert _one_line(stalled, "database") == 1
    line = capsys.readouterr().err.strip()
    assert line == "tollgate: database: no answer within the bound (DB_TIMEOUT, DB_CONNECT_TIMEOUT)"


def test_a_log_read_that_found_no_database_is_one_line(capsys):
    """`projections rebuild` through a stalled database ended in a traceback: its reads of
    the log raise the log's own error."""
    from service.cli import _one_line
    from service.eventlog import EventLogUnavailable

    def rebuild() -> int:
        raise EventLogUnavailable("the database did not answer within 2 s")

    assert _one_line(rebuild, "database") == 1
    assert capsys.readouterr().err == "tollgate: database: the database did not answer within 2 s\n"
