"""What every connection asks of the server at its start (`session_settings`): the peer
timeouts, unless DATABASE_URL names a setting itself; and a warning at the start when it
names one that lets the server free a cut-off host's locks too soon. The partition fault
test (tests/faults/test_partition.py) shows what they do."""

from __future__ import annotations

import pytest
import structlog

from service.storage.database import (
    DROP_AT_LEAST,
    PEER_TIMEOUTS,
    SESSION_CHECK,
    dropped_after,
    session_settings,
    url_settings,
    warn_if_dropped_too_soon,
)


def test_every_peer_timeout_is_sent() -> None:
    assert session_settings("postgresql://tollgate@db.internal:5432/tollgate") == PEER_TIMEOUTS
    assert session_settings("postgresql://postgres@/tollgate?host=/run/pg") == PEER_TIMEOUTS


def test_a_setting_in_the_url_is_left_to_the_url() -> None:
    dsn = "postgresql://tollgate@db.internal/tollgate?sslmode=require&tcp_keepalives_idle=60"
    sent = session_settings(dsn)
    assert "tcp_keepalives_idle" not in sent
    assert sent == {k: v for k, v in PEER_TIMEOUTS.items() if k != "tcp_keepalives_idle"}


def test_the_answer_is_a_copy() -> None:
    session_settings("postgresql://db/x")["tcp_user_timeout"] = "1"
    assert PEER_TIMEOUTS["tcp_user_timeout"] == "25000"


def test_a_blank_setting_in_the_url_is_ours() -> None:
    # asyncpg drops a blank parameter: leaving ours out too would send neither.
    assert session_settings("postgresql://db/x?tcp_user_timeout=") == PEER_TIMEOUTS


def test_settings_in_the_urls_options_are_left_to_the_url() -> None:
    # The server applies `options` before the startup parameters: ours would override them.
    dsn = (
        "postgresql://db/x?options=-c%20TCP_KEEPALIVES_IDLE%3D60%20"
        "--tcp-user-timeout%3D30s%20-ctcp_keepalives_count%3D4%20-c%20search_path%3Da%5C%20b"
    )
    assert url_settings(dsn) == {
        "tcp_keepalives_idle": "60",
        "tcp_user_timeout": "30s",
        "tcp_keepalives_count": "4",
        "search_path": "a b",
    }
    assert session_settings(dsn) == {"tcp_keepalives_interval": "5"}


@pytest.mark.parametrize(
    ("query", "seconds"),
    [
        ("", 25.0),  # ours: the user timeout, past the first probe at 10 s
        ("?tcp_user_timeout=10000", 10.0),
        ("?tcp_user_timeout=12s", 12.0),
        ("?tcp_user_timeout=0.25min", 15.0),
        ("?tcp_user_timeout=5000&tcp_keepalives_idle=20", 20.0),  # no probe before 20 s
        ("?tcp_user_timeout=0", 25.0),  # no user timeout: 10 s, then 3 probes 5 s apart
        ("?tcp_user_timeout=0&tcp_keepalives_idle=2&tcp_keepalives_interval=1", 5.0),
        ("?tcp_user_timeout=0&tcp_keepalives_idle=0", 7215.0),  # the system's 2 h idle
        ("?tcp_user_timeout=0&tcp_keepalives_count=0", 55.0),  # the system's 9 probes
        ("?options=-c%20tcp_user_timeout%3D9000", 10.0),
        ("?tcp_user_timeout=soon", None),  # the server refuses it at the start
        ("?host=/run/pg&tcp_user_timeout=10000", 10.0),  # the URL's host (db.internal) first
        ("?tcp_user_timeout=10parsecs", None),
    ],
)
def test_how_soon_the_server_drops_a_silent_client(query: str, seconds: float | None) -> None:
    assert dropped_after(f"postgresql://tollgate@db.internal/tollgate{query}") == seconds


def test_a_url_that_lets_the_server_drop_a_holder_too_soon_is_warned_of() -> None:
    dsn = "postgresql://tollgate:hunter2@db.internal/tollgate?tcp_user_timeout=10000"
    with structlog.testing.capture_logs() as logs:
        warn_if_dropped_too_soon(dsn)
    assert [(e["event"], e["dropped_after_s"], e["at_least_s"]) for e in logs] == [
        ("database.peer_timeouts_short", 10.0, DROP_AT_LEAST)
    ]
    assert DROP_AT_LEAST == 3 * SESSION_CHECK
    assert "hunter2" not in repr(logs)


@pytest.mark.parametrize(
    "query", ["", "?tcp_user_timeout=15000", "?tcp_user_timeout=soon", "?tcp_keepalives_idle=0"]
)
def test_the_defaults_and_what_cannot_be_read_are_not_warned_of(query: str) -> None:
    with structlog.testing.capture_logs() as logs:
        warn_if_dropped_too_soon(f"postgresql://tollgate@db.internal/tollgate{query}")
    assert logs == []


@pytest.mark.parametrize(
    ("dsn", "warned"),
    [
        ("postgresql://postgres@/tollgate?host=/run/pg&tcp_user_timeout=10000", False),
        ("postgresql://postgres@%2Frun%2Fpg/tollgate?tcp_user_timeout=10000", False),
        ("postgresql://db1,db2/tollgate?tcp_user_timeout=10000", True),
        ("postgresql:///tollgate?host=/run/pg,db.internal&tcp_user_timeout=10000", True),
        ("postgresql:///tollgate?tcp_user_timeout=10000", True),  # no host named: maybe TCP
    ],
)
def test_a_url_of_unix_sockets_only_is_not_warned_of(dsn: str, warned: bool) -> None:
    with structlog.testing.capture_logs() as logs:
        warn_if_dropped_too_soon(dsn)
    assert bool(logs) == warned
