"""DATABASE_URLs built for tests from the test database's own."""

from __future__ import annotations

from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit


def with_short_drop(dsn: str) -> str:
    """`dsn` with `tcp_user_timeout=10000`: a server that would drop a silent session
    after 10 s. The embedded test server is reached by a Unix socket, which ignores TCP
    settings (and is not warned of): a TCP host is named after the socket, which asyncpg
    tries first and which answers."""
    parts = urlsplit(dsn)
    query = dict(parse_qsl(parts.query))
    if not parts.hostname and query.get("host", "").startswith("/"):
        query["host"] += ",127.0.0.1"
    query["tcp_user_timeout"] = "10000"
    return urlunsplit(parts._replace(query=urlencode(query, safe="/,")))
