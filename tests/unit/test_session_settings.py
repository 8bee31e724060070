"""What every connection asks of the server at its start (`session_settings`): the peer
timeouts, unless DATABASE_URL names a setting itself. The partition fault test
(tests/faults/test_partition.py) shows what they do."""

from __future__ import annotations

from service.storage.database import PEER_TIMEOUTS, session_settings


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
