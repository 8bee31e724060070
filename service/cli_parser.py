"""The `tollgate` command line: every command and its arguments, described for `--help`."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

DESCRIPTION = (
    "Tollgate: OAuth 2.0 tokens and API access policy, kept in an event log. Every command "
    "reads the service's configuration from the environment (and a .env file in the working "
    "directory); `tollgate config check` shows it."
)
EPILOG = (
    "`tollgate COMMAND --help` describes a command; `tollgate COMMAND ACTION --help` an action."
)


def _command(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
    name: str,
    summary: str,
    description: str,
) -> argparse.ArgumentParser:
    """A (sub)command: `summary` in its parent's list, `description` atop its own --help."""
    return sub.add_parser(name, help=summary, description=description)


def parser(projection_names: Sequence[str], version: str) -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="tollgate", description=DESCRIPTION, epilog=EPILOG)
    top.add_argument("--version", action="version", version=f"%(prog)s {version}")
    sub = top.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = _command(
        sub, "serve", "run the service (HTTP, projections, notifier)",
        "Run the HTTP service on HOST:PORT with the SQL projections (unless "
        "RUN_PROJECTIONS=false) and the IP-violation notifier; stops cleanly on Ctrl-C or "
        "SIGTERM. Several hosts may serve one DATABASE_URL.",
    )  # fmt: skip
    serve.add_argument(
        "--workers", type=int, default=None, metavar="N",
        help="service processes sharing the port, 1 to 64, under a parent that runs the "
        "SQL projections in a process of their own (default: one process doing both)",
    )  # fmt: skip
    _projections(sub, projection_names)
    _directory(sub)
    _history(sub)
    config = _command(
        sub, "config", "the configuration: check it, show it",
        "The configuration that every command reads from the environment (and .env).",
    )  # fmt: skip
    _command(
        config.add_subparsers(dest="action", required=True, metavar="ACTION"),
        "check", "check the configuration and print it, secrets masked",
        "Check every setting and file (PERMISSIONS_FILE, ROUTES_FILE) as `tollgate serve` "
        "does at start. Valid: print the effective configuration as VARIABLE=value lines, "
        "secrets masked, and exit 0. Invalid: print each problem as one line naming its "
        "variable, and exit 2. The database is not contacted.",
    )  # fmt: skip
    return top


def _projections(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], names: Sequence[str]
) -> None:
    projections = _command(
        sub, "projections", "projection status, rebuild and worker",
        f"The SQL read models ({', '.join(names)}): where each stands in the event log, "
        "rebuilding one from the start, or running them as a process of their own.",
    )  # fmt: skip
    psub = projections.add_subparsers(dest="action", required=True, metavar="ACTION")
    _command(
        psub, "status", "position and lag of each projection",
        "One JSON line per projection: its position, the log's head, and how far behind it "
        "is in events and in seconds.",
    )  # fmt: skip
    rebuild = _command(
        psub, "rebuild", "rebuild projections from position 0",
        "Rebuild from the start of the event log into copies of the tables, then switch them "
        "in one transaction: the service keeps serving the old rows meanwhile. Progress, "
        "with the time left, goes to stderr; one JSON line per projection to stdout.",
    )  # fmt: skip
    rebuild.add_argument(
        "name", nargs="?", choices=names, metavar="NAME",
        help=f"one projection: {', '.join(names)} (default: all)",
    )  # fmt: skip
    run = _command(
        psub, "run", "run the projections as their own process",
        "Apply each new event to every SQL projection until stopped (Ctrl-C, SIGTERM). Set "
        "RUN_PROJECTIONS=false on the services then; a second runner stands by on the "
        "advisory locks, so one may run on each of two hosts.",
    )  # fmt: skip
    run.add_argument(
        "--until-caught-up", action="store_true", help="stop once every projection is at the head"
    )


def _directory(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    company = _command(sub, "company", "companies", "Companies: the tenants of Tollgate.")
    create = _command(
        company.add_subparsers(dest="action", required=True, metavar="ACTION"),
        "create", "create a company with a first admin user and key",
        "Create a company, its first admin user (with a generated password) and an admin "
        "key, and print them as JSON: the password and the key are shown this once.",
    )  # fmt: skip
    create.add_argument("name", help="the company's name")
    create.add_argument("--admin-email", required=True, help="the first admin user's email")
    servers = _command(
        sub, "resource-server", "resource servers",
        "Resource servers: the APIs that ask /oauth/introspect and /policy/check.",
    )  # fmt: skip
    rs_actions = servers.add_subparsers(dest="action", required=True, metavar="ACTION")
    rs_create = _command(
        rs_actions,
        "create", "register one; prints its key (shown once)",
        "Register a resource server and print its id and key as JSON: the key is shown this "
        "once and stored only as a hash.",
    )  # fmt: skip
    rs_create.add_argument("name", help="the resource server's name")
    _command(
        rs_actions, "list", "every resource server, one JSON object a line (never a key)",
        "Every resource server registered, revoked ones included, as JSON lines: id, name "
        "and whether it is revoked.",
    )  # fmt: skip
    rs_revoke = _command(
        rs_actions, "revoke", "revoke one's key: refused from then on, by every process",
        "Revoke a resource server's key: /oauth/introspect and /policy/check refuse it from "
        "then on. Revoking a revoked one changes nothing; an unknown id is an error.",
    )  # fmt: skip
    rs_revoke.add_argument("resource_server_id", help="the id `create` or `list` printed")


def _history(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    events = _command(
        sub, "events", "event history, one JSON object a line (as GET /admin/events)",
        "The event history as JSON lines, oldest first, as GET /admin/events shows it: who "
        "(actor), what, when, from where (client IP) and under which request id.",
    )  # fmt: skip
    events.add_argument("--company", metavar="ID", help="one company's events (default: all)")
    events.add_argument("--after", metavar="N", help="events after this position (default 0)")
    events.add_argument("--limit", metavar="N", help="at most N events, 1 to 1000 (default: all)")
    events.add_argument("--type", metavar="T", help="only events of this type")
    events.add_argument("--stream", metavar="S", help="only events of this stream")
    events.set_defaults(action="list")
    audit = _command(
        sub, "audit", "auditing the event log",
        "Check the event log's hash chain, or see the state it held at a past moment.",
    )  # fmt: skip
    asub = audit.add_subparsers(dest="action", required=True, metavar="ACTION")
    _command(
        asub, "verify", "walk the hash chain; exit 1 at the first broken link",
        "Walk the hash chain from the first event. Intact: print the head and its hash "
        "(record it elsewhere: a truncated tail changes it). Broken: print how far the "
        "chain holds and the first broken link, and exit 1.",
    )  # fmt: skip
    replay = _command(
        asub, "replay", "applications, connections and live tokens as they were at a moment",
        "Replay the log up to a position or a moment and print the applications, "
        "connections and live tokens as they were then, as JSON.",
    )  # fmt: skip
    replay.add_argument(
        "--until", required=True, metavar="POSITION|TIMESTAMP", help="log position or ISO 8601"
    )
    replay.add_argument("--output", metavar="FILE", help="write the JSON here (default: stdout)")
