"""The `tollgate` command: serve, projections, audit."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any

import asyncpg
import msgspec
import structlog

from service.settings import ConfigError, Settings, load_settings

log = structlog.get_logger()

Command = Callable[[Settings, argparse.Namespace], Coroutine[Any, Any, int]]


def _parser() -> argparse.ArgumentParser:
    from projections.catalog import sql_projections
    from service.cli_parser import parser

    return parser([projection.name for projection in sql_projections()], _version())


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("tollgate")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "(not installed)"


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = load_settings()
    except ConfigError as exc:
        return _problems(exc)
    if args.command == "config":
        return _config_check(settings)
    from service.logs import configure_logging

    configure_logging(settings.log_format, settings.log_level)
    if args.command == "serve":
        if args.workers is not None and not 1 <= args.workers <= 64:
            print("tollgate: --workers must be between 1 and 64", file=sys.stderr)
            return 2
        if args.workers is not None:
            from service.workers import serve_workers

            # The port is taken, the host unknown, the database unreachable: one line.
            return _one_line(lambda: serve_workers(settings, args.workers), "cannot serve")
        return _one_line(lambda: _serve(settings), "cannot serve")
    from service.web.server import run_as_served

    command: Command = _COMMANDS[(args.command, args.action)]
    try:
        # The database cannot be reached (or started): one line, not a traceback. On the
        # service's event loop and collector settings: `projections run` is a service too.
        return _one_line(lambda: run_as_served(command(settings, args)), "database")
    except KeyboardInterrupt:
        return 130


def _one_line(run: Callable[[], int], what: str) -> int:
    """Run a command; what stops it for a known reason is one line and an exit code."""
    from projections.runner import RebuildInProgress
    from service.eventlog import EventLogUnavailable
    from service.events import UnknownEventType

    try:
        return run()
    except ConfigError as exc:
        return _problems(exc)
    except RebuildInProgress as exc:
        print(f"tollgate: {exc}", file=sys.stderr)
        return 1
    except UnknownEventType as exc:
        # written by a newer Tollgate (a roll under way), or altered: verify tells which
        hint = "upgrade, or run `tollgate audit verify`"
        print(f"tollgate: {what}: {exc}; {hint}".splitlines()[0], file=sys.stderr)
        return 1
    except (
        OSError, asyncpg.PostgresError, asyncpg.InterfaceError, RuntimeError,
        EventLogUnavailable,  # the log's reads, a rebuild's among them, that found no database
    ) as exc:  # fmt: skip
        print(f"tollgate: {what}: {_reason(exc)}".splitlines()[0], file=sys.stderr)
        return 1


def _reason(exc: BaseException) -> str:
    """What went wrong, never an empty line: a bound that ran out (TimeoutError) has no
    message of its own."""
    from service.logs import error_text

    if isinstance(exc, TimeoutError) and not str(exc):
        return "no answer within the bound (DB_TIMEOUT, DB_CONNECT_TIMEOUT)"
    return error_text(exc)


def _problems(exc: ConfigError) -> int:
    for problem in exc.problems:
        print(f"tollgate: {problem}", file=sys.stderr)
    return 2


#: variables whose name is not their setting's name in capitals
_VARIABLES = {"pool_size": "DB_POOL_SIZE"}


def _config_check(settings: Settings) -> int:
    """Print the effective configuration as VARIABLE=value lines: the secrets (the fields
    kept out of repr) and the password in a URL masked."""
    import dataclasses

    from service.settings import MASK, mask_url

    for field in dataclasses.fields(settings):
        value = getattr(settings, field.name)
        if field.name == "extra":
            continue
        if value is None:
            text = ""
        elif not field.repr:
            text = MASK
        elif isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, tuple):
            text = ",".join(str(item) for item in value)
        elif isinstance(value, float):
            text = f"{value:g}"  # as the variable is written: DB_TIMEOUT=5, not 5.0
        else:
            text = mask_url(value) if isinstance(value, str) else str(value)
        print(f"{_VARIABLES.get(field.name, field.name.upper())}={text}")
    return 0


def _serve(settings: Settings) -> int:
    from service.app import SUPERVISOR, create_app
    from service.web.server import serve
    from service.workers import as_worker, bind_to_parent

    reuse_port = os.environ.get("TOLLGATE_REUSE_PORT") == "1"  # a worker of `--workers N`
    if reuse_port:
        bind_to_parent()
    app = create_app(settings)
    if reuse_port:
        as_worker(app)
    serve(app, settings, reuse_port=reuse_port)
    supervisor = app.get(SUPERVISOR)
    if supervisor is not None and supervisor.gave_up:
        print("tollgate: the embedded PostgreSQL died and could not be restarted", file=sys.stderr)
        return 1
    return 0


def _print_json(value: Any, *, flush: bool = False) -> None:
    """One JSON line on stdout (`flush`: out now, not when the buffer fills); a reader that
    has gone (`| head`) silences the rest of the output, not the command."""
    try:
        sys.stdout.write(msgspec.json.encode(value).decode() + "\n")
        if flush:
            sys.stdout.flush()
    except BrokenPipeError:
        _stdout_gone()


def _stdout_gone() -> None:
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


async def _with_runner(
    settings: Settings,
    body: Callable[[Any], Awaitable[int]],
    *,
    listen: bool = False,
    moved: Callable[[str, int], None] | None = None,
    snapshots: bool = False,
) -> int:
    from projections.catalog import sql_projections
    from projections.runner import ProjectionRunner
    from projections.snapshots import writer
    from service.eventlog import EventLog
    from service.storage.database import open_database

    database = await open_database(settings, min_size=1)
    # The SQL projections read what they apply from the table: they need the head, not
    # the events each commit announces.
    eventlog = EventLog(database.pool, database.dsn if listen else None, announcements=False)
    await eventlog.start()
    try:
        runner = ProjectionRunner(
            eventlog,
            database.pool,
            database.dsn,
            sql_projections(),
            batch_size=settings.projection_batch_size,
            moved=moved,
            snapshots=writer(eventlog, database, settings.model_snapshot_every)
            if snapshots
            else None,
        )
        await runner.ensure_checkpoints()
        return await body(runner)
    finally:
        await eventlog.close()
        await database.close()


async def _projections_status(settings: Settings, _args: argparse.Namespace) -> int:
    async def body(runner: Any) -> int:
        for status in await runner.status():
            _print_json(
                {
                    "name": status.name,
                    "position": status.position,
                    "head": status.head,
                    "lag_events": status.lag_events,
                    "lag_seconds": round(status.lag_seconds, 3),
                }
            )
        return 0

    return await _with_runner(settings, body)


async def _projections_rebuild(settings: Settings, args: argparse.Namespace) -> int:
    from service.notification.notifier import restart_if_rewritten
    from service.progress import progress_reporter

    async def body(runner: Any) -> int:
        names = [args.name] if args.name is not None else list(runner.projections)
        unknown = [n for n in names if n not in runner.projections]
        if unknown:
            raise ConfigError(f"no projection named {unknown[0]!r}")
        with progress_reporter() as report:
            for name in names:
                position = await runner.rebuild(name, report)
                _print_json({"name": name, "rebuilt_to": position}, flush=True)
        if args.name is None and await restart_if_rewritten(runner.pool):
            _print_json({"name": "notifier", "restarted_from": 0}, flush=True)
        return 0

    return await _with_runner(settings, body)


async def _projections_run(settings: Settings, args: argparse.Namespace) -> int:
    from service.metrics import Metrics, multiprocess_dir
    from service.web.server import stop_signals, stopping_on, unblock_stop_signals
    from service.workers import bind_to_parent

    bind_to_parent()  # the projections process of `serve --workers N` dies with its parent
    # Under `serve --workers N`, what it counts (and its process metrics) reach every scrape
    # through the workers' shared directory, as a worker's do.
    metrics = Metrics() if multiprocess_dir() is not None else None

    closing = False

    async def body(runner: Any) -> int:
        nonlocal closing
        try:
            if args.until_caught_up:
                for name in runner.projections:
                    await runner.catch_up(name)
                return 0
            await runner.run_forever()
            return 0
        finally:
            closing = True

    # SIGTERM (from `serve --workers`' parent, or a supervisor), SIGINT and SIGHUP stop it as
    # they stop `serve`: the work is cancelled, the sessions closed, the last lines logged
    # (Python's default ended the process at once, mid-line). Set before the database is
    # opened and kept to the end; neither a second signal nor one that comes as the
    # sessions close cuts that short.
    loop = asyncio.get_running_loop()
    main = asyncio.current_task()
    assert main is not None
    received: list[signal.Signals] = []

    def stopping(signum: signal.Signals) -> None:
        if not received:
            received.append(signum)
            if not closing:
                main.cancel()  # first: nothing after it (a line to a closed terminal) holds it
            log.info("projections.stopping", signal=stopping_on(signum))

    for signum in stop_signals():
        loop.add_signal_handler(signum, stopping, signum)
    unblock_stop_signals()
    moved = metrics.projection_moved if metrics is not None else None
    try:
        done = await _with_runner(settings, body, listen=True, moved=moved, snapshots=True)
    except asyncio.CancelledError:
        if not received:
            raise
        main.uncancel()  # asked for by the signal, and done: the task goes on to its end
        # --until-caught-up promised a caught-up log with 0: stopped short, it says so
        return 128 + received[0] if args.until_caught_up else 0
    return done


async def _audit_verify(settings: Settings, _args: argparse.Namespace) -> int:
    from service.audit.verify import verify_log
    from service.storage.database import open_database

    database = await open_database(settings, min_size=1)
    try:
        result = await verify_log(database.pool)
    finally:
        await database.close()
    good_hash = result.head_hash.hex() if result.head_hash else None
    if result.broken is None:
        # The head hash is the anchor to record elsewhere: a truncated tail changes it.
        _print_json({"ok": True, "checked": result.checked, "head": result.head,
                     "head_hash": good_hash})  # fmt: skip
        return 0
    # Broken: no head to anchor; say how far the chain holds and where it breaks.
    _print_json(
        {
            "ok": False,
            "checked": result.checked,
            "intact_through": result.broken.position - 1,
            "intact_hash": good_hash,
            "broken_at": result.broken.position,
            "reason": result.broken.reason,
        }
    )
    return 1


async def _audit_replay(settings: Settings, args: argparse.Namespace) -> int:
    from pathlib import Path

    from service.audit.replay import ReplayError, encode, parse_until, replay
    from service.storage.database import open_database

    try:
        until = parse_until(args.until)
    except ReplayError as exc:
        raise ConfigError(f"--until: {exc}") from None
    database = await open_database(settings, min_size=1)
    try:
        state = await replay(database.pool, until)
    except ReplayError as exc:
        raise ConfigError(f"--until: {exc}") from None
    finally:
        await database.close()
    if args.output is None:
        sys.stdout.buffer.write(encode(state))
        return 0
    try:
        await asyncio.to_thread(Path(args.output).write_bytes, encode(state))
    except OSError as exc:
        raise ConfigError(f"--output: cannot write {args.output}: {exc.strerror}") from None
    _print_json(
        {
            "position": state.position,
            "at": state.at,
            "output": args.output,
            "applications": len(state.applications),
            "connections": len(state.connections),
            "tokens": len(state.tokens),
        }
    )
    return 0


async def _company_create(settings: Settings, args: argparse.Namespace) -> int:
    from service.commands.directory import create_company
    from service.domain.applications import FieldError
    from service.errors import TollgateError
    from service.runtime import open_context

    async with open_context(settings) as ctx:
        try:
            company = await create_company(ctx, args.name, args.admin_email, _cli_meta())
        except (FieldError, TollgateError) as exc:
            raise ConfigError(str(exc)) from None
    _print_json(
        {
            "company_id": company.company_id,
            "admin_user_id": company.admin_user_id,
            "admin_email": company.admin_email,
            "admin_password": company.admin_password,
            "admin_key_id": company.admin_key_id,
            "admin_key": company.admin_key,
        }
    )
    return 0


async def _resource_server_create(settings: Settings, args: argparse.Namespace) -> int:
    from service.commands.directory import register_resource_server
    from service.errors import TollgateError
    from service.runtime import open_context

    async with open_context(settings) as ctx:
        try:
            server_id, key = await register_resource_server(ctx, args.name, _cli_meta())
        except TollgateError as exc:
            raise ConfigError(str(exc)) from None
    _print_json({"resource_server_id": server_id, "name": args.name.strip(), "key": key})
    return 0


async def _resource_server_list(settings: Settings, _args: argparse.Namespace) -> int:
    from service.commands.directory import list_resource_servers
    from service.runtime import open_context

    async with open_context(settings) as ctx:
        servers = await list_resource_servers(ctx)
    for server in servers:
        _print_json({"resource_server_id": server.resource_server_id, "name": server.name,
                     "revoked": server.revoked})  # fmt: skip
    return 0


async def _resource_server_revoke(settings: Settings, args: argparse.Namespace) -> int:
    from service.commands.directory import revoke_resource_server
    from service.errors import TollgateError
    from service.runtime import open_context

    async with open_context(settings) as ctx:
        try:
            await revoke_resource_server(ctx, args.resource_server_id, _cli_meta())
        except TollgateError as exc:
            raise ConfigError(str(exc)) from None
    _print_json({"resource_server_id": args.resource_server_id, "revoked": True})
    return 0


async def _events(settings: Settings, args: argparse.Namespace) -> int:
    import dataclasses

    from service.audit import history
    from service.storage.database import open_database

    params = {"after": args.after, "limit": args.limit, "type": args.type, "stream": args.stream}
    try:
        query = history.parse(params, args.company)
    except history.HistoryError as exc:
        raise ConfigError(f"--{exc}") from None
    remaining = query.limit if args.limit is not None else None  # default: every event
    database = await open_database(settings, min_size=1)
    try:
        if args.company is not None and not await history.company_known(
            database.pool, args.company
        ):
            raise ConfigError(f"--company: no company {args.company!r} in the event log")
        while remaining is None or remaining > 0:
            size = history.MAX_LIMIT if remaining is None else min(remaining, history.MAX_LIMIT)
            items = await history.read(database.pool, dataclasses.replace(query, limit=size))
            for item in items:
                _print_json(item)
            sys.stdout.flush()
            if len(items) < size:
                break
            query = dataclasses.replace(query, after=items[-1]["position"])
            remaining = None if remaining is None else remaining - len(items)
    except BrokenPipeError:  # `tollgate events | head`: the reader has had enough
        _stdout_gone()
    finally:
        await database.close()
    return 0


def _cli_meta() -> Any:
    import getpass
    import secrets

    from service.eventlog import Metadata

    try:
        who = getpass.getuser()
    except (KeyError, OSError):  # a container's user id with no passwd entry and no $USER
        who = f"uid-{os.getuid()}"
    return Metadata(actor=f"cli:{who}", request_id=f"cli-{secrets.token_hex(6)}")


_COMMANDS: dict[tuple[str, str], Command] = {
    ("company", "create"): _company_create,
    ("resource-server", "create"): _resource_server_create,
    ("resource-server", "list"): _resource_server_list,
    ("resource-server", "revoke"): _resource_server_revoke,
    ("projections", "status"): _projections_status,
    ("projections", "rebuild"): _projections_rebuild,
    ("projections", "run"): _projections_run,
    ("audit", "verify"): _audit_verify,
    ("audit", "replay"): _audit_replay,
    ("events", "list"): _events,
}
