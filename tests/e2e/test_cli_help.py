"""`tollgate --help` teaches the command line: every command and action says what it
does, `projections rebuild` lists the projections, and a rebuild on a terminal shows the
time left (on stderr: stdout stays JSON)."""

from __future__ import annotations

import json
import os
import pty
import re
import select
import subprocess
import sys

import pytest

from projections.catalog import sql_projections
from service.cli import main
from tests.e2e.hosts import admin_key

#: at least these; any other command found in a list is held to the same rule
KNOWN = {
    ("serve",), ("projections",), ("projections", "status"), ("projections", "rebuild"),
    ("projections", "run"), ("company",), ("company", "create"), ("resource-server",),
    ("resource-server", "create"), ("events",), ("audit",), ("audit", "verify"),
    ("audit", "replay"), ("config",), ("config", "check"),
}  # fmt: skip
LISTED = re.compile(r"^    ([a-z-]+)(?:\s*\n {10,}|\s+)(\S[^\n]*)$", flags=re.M)


def help_of(capsys, command: tuple[str, ...]) -> str:
    with pytest.raises(SystemExit) as exited:
        main([*command, "--help"])
    assert exited.value.code == 0
    return capsys.readouterr().out


def description(help_text: str) -> str:
    """The paragraph after the usage lines: what the command does."""
    paragraphs = help_text.split("\n\n")
    assert paragraphs[0].startswith("usage: tollgate")
    first = paragraphs[1]
    return "" if first.startswith(("positional arguments:", "options:")) else first


def commands(capsys, parent: tuple[str, ...] = ()) -> dict[tuple[str, ...], str]:
    """Every command and action reachable from `parent`'s --help, with its one-line summary."""
    found: dict[tuple[str, ...], str] = {}
    text = help_of(capsys, parent)
    if "COMMAND ..." not in text and "ACTION ..." not in text:
        return found
    for name, summary in LISTED.findall(text.split("options:")[0]):
        found[(*parent, name)] = summary
        found |= commands(capsys, (*parent, name))
    return found


def test_every_command_and_action_describes_itself_and_is_summed_up_in_its_list(capsys):
    listed = commands(capsys)
    assert set(listed) >= KNOWN, sorted(KNOWN - set(listed))
    assert len(description(help_of(capsys, ()))) > 40
    for command, summary in listed.items():
        assert len(summary.split()) >= 1, command
        text = description(help_of(capsys, command))
        assert len(text.split()) >= 5, f"tollgate {' '.join(command)} --help says nothing"


def test_rebuild_help_lists_the_projections_and_refuses_another_name(capsys):
    names = [p.name for p in sql_projections()]
    text = help_of(capsys, ("projections", "rebuild"))
    assert all(name in text for name in names)
    with pytest.raises(SystemExit) as refused:
        main(["projections", "rebuild", "no_such_projection"])
    assert refused.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'no_such_projection'" in err
    assert all(repr(name) in err for name in names)


async def test_a_rebuild_on_a_terminal_shows_the_time_left_on_stderr(db, tmp_path):
    await admin_key(db, tmp_path)  # a few events to rebuild from
    leader, follower = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "service", "projections", "rebuild", "companies"],
        env={**os.environ, "DATABASE_URL": db.dsn, "LOG_FORMAT": "json", "LOG_LEVEL": "warning",
             "COLUMNS": "120", "TERM": "xterm"},
        stdout=subprocess.PIPE, stderr=follower, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    os.close(follower)
    screen = b""
    while True:
        ready, _, _ = select.select([leader], [], [], 60)
        assert ready, "the rebuild stopped writing for a minute"
        try:
            chunk = os.read(leader, 4096)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        screen += chunk
    os.close(leader)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, screen.decode(errors="replace")
    shown = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", screen.decode(errors="replace"))
    assert "companies" in shown
    assert re.search(r"eta \d+:\d\d:\d\d", shown), shown
    # stdout carries the result alone, one JSON object a line
    [line] = out.decode().splitlines()
    assert json.loads(line)["name"] == "companies"
