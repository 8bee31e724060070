"""A command of the command line runs as the service does: on its event loop and with its
collector threshold. `tollgate projections run` is a long-lived process of the service."""

from __future__ import annotations

import asyncio
import gc
from typing import Any

from service import cli
from service.web.server import GC_THRESHOLD, event_loop_factory


def test_a_command_runs_on_the_services_event_loop_and_collector_settings(monkeypatch):
    seen: dict[str, Any] = {}

    async def command(_settings: Any, _args: Any) -> int:
        seen["threshold"] = gc.get_threshold()
        seen["loop"] = type(asyncio.get_running_loop())
        return 0

    monkeypatch.setitem(cli._COMMANDS, ("projections", "run"), command)
    # The process's logging is left as the suite has it: configured as a command's, with
    # loggers cached on first use, later tests' captured logs would miss their lines.
    monkeypatch.setattr("service.logs.configure_logging", lambda *_args: None)
    before = gc.get_threshold()
    gc.set_threshold(700, 10, 10)  # CPython's default, whatever ran before in this process
    try:
        assert cli.main(["projections", "run"]) == 0
    finally:
        gc.set_threshold(*before)
    assert seen["threshold"] == GC_THRESHOLD
    factory = event_loop_factory()
    assert factory is not None  # uvloop is a dependency of the service
    loop = factory()
    try:
        assert seen["loop"] is type(loop)
    finally:
        loop.close()


def test_a_user_id_with_no_account_is_named_by_its_number(monkeypatch):
    """A container's arbitrary user id (Kubernetes runAsUser) with no passwd entry and no
    $USER: what a command records is done by `cli:uid-N`, not a KeyError's traceback."""
    import getpass
    import os

    def no_account() -> str:
        raise KeyError(f"getpwuid(): uid not found: {os.getuid()}")

    monkeypatch.setattr(getpass, "getuser", no_account)
    assert cli._cli_meta().actor == f"cli:uid-{os.getuid()}"
