"""Browser sessions: a random cookie value, stored only as a digest, with a CSRF token."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import asyncpg

from service.domain import credentials

COOKIE = "tg_session"
LIFETIME = timedelta(hours=8)


@dataclass(frozen=True)
class Session:
    user_id: str
    company_id: str
    csrf_hash: str

    def csrf_ok(self, token: str) -> bool:
        return credentials.matches(token, self.csrf_hash)


async def create(pool: asyncpg.Pool, user_id: str, company_id: str) -> tuple[str, str]:
    """Returns (cookie value, CSRF token); both appear nowhere else in clear."""
    value = credentials.random_token(32)
    csrf = credentials.random_token(24)
    await pool.execute(
        "INSERT INTO web_sessions (session_hash, user_id, company_id, csrf_hash, expires_at) "
        "VALUES ($1, $2, $3, $4, $5)",
        credentials.digest(value),
        user_id,
        company_id,
        credentials.digest(csrf),
        datetime.now(UTC) + LIFETIME,
    )
    return value, csrf


async def load(pool: asyncpg.Pool, value: str) -> Session | None:
    if not 20 <= len(value) <= 100:
        return None
    row = await pool.fetchrow(
        "SELECT user_id, company_id, csrf_hash FROM web_sessions "
        "WHERE session_hash = $1 AND expires_at > now()",
        credentials.digest(value),
    )
    return None if row is None else Session(row["user_id"], row["company_id"], row["csrf_hash"])


async def delete(pool: asyncpg.Pool, value: str) -> None:
    await pool.execute(
        "DELETE FROM web_sessions WHERE session_hash = $1 OR expires_at <= now()",
        credentials.digest(value),
    )
