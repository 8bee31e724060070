"""Browser sessions: a random cookie value, stored only as a digest, with a CSRF token
derived from it."""

from __future__ import annotations

import base64
import hashlib
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
    #: the version of the user's password it was opened with (None: opened before
    #: sessions recorded it); auth.signed_in refuses it once the password has changed
    user_version: int | None = None

    def csrf_ok(self, token: str) -> bool:
        return credentials.matches(token, self.csrf_hash)


def csrf_of(value: str) -> str:
    """The CSRF token of the session whose cookie is `value`: any page that holds the
    cookie knows it, whichever page opened the session (the consent page's sign-in, POST
    /session, the dashboard's), and no one without the cookie can compute it. One-way:
    a token seen in a page tells nothing of the cookie, nor of its digest in the table."""
    mac = hashlib.sha256(b"tollgate csrf\x00" + value.encode("utf-8", "surrogateescape"))
    return base64.urlsafe_b64encode(mac.digest()).rstrip(b"=").decode()


async def create(
    pool: asyncpg.Pool,
    user_id: str,
    company_id: str,
    *,
    user_version: int | None = None,
    replacing: str | None = None,
) -> tuple[str, str]:
    """Returns (cookie value, CSRF token); both appear nowhere else in clear. `replacing`:
    the session cookie the browser held, whose session ends in the same statement (and
    the expired ones with it): the new cookie overwrites it, and the session would
    otherwise stay usable, for its hours left, by whoever had copied it."""
    value = credentials.random_token(32)
    csrf = csrf_of(value)
    await pool.execute(
        "WITH ended AS (DELETE FROM web_sessions WHERE session_hash = $6 OR expires_at <= now()) "
        "INSERT INTO web_sessions "
        "(session_hash, user_id, company_id, csrf_hash, expires_at, user_version) "
        "VALUES ($1, $2, $3, $4, $5, $7)",
        credentials.digest(value),
        user_id,
        company_id,
        credentials.digest(csrf),
        datetime.now(UTC) + LIFETIME,
        credentials.digest(replacing) if replacing else None,
        user_version,
    )
    return value, csrf


async def load(pool: asyncpg.Pool, value: str) -> Session | None:
    if not 20 <= len(value) <= 100:
        return None
    row = await pool.fetchrow(
        "SELECT user_id, company_id, csrf_hash, user_version FROM web_sessions "
        "WHERE session_hash = $1 AND expires_at > now()",
        credentials.digest(value),
    )
    if row is None:
        return None
    return Session(row["user_id"], row["company_id"], row["csrf_hash"], row["user_version"])


async def delete(pool: asyncpg.Pool, value: str) -> None:
    await pool.execute(
        "DELETE FROM web_sessions WHERE session_hash = $1 OR expires_at <= now()",
        credentials.digest(value),
    )


# --- a sign-in waiting for the person to choose a company -------------------------------

#: How long a person has to choose among the companies whose accounts the password opened.
CHOICE_LIFETIME = timedelta(minutes=5)


@dataclass(frozen=True)
class Choice:
    """The accounts a password matched, each with its stream version then (a password
    changed or a user removed meanwhile drops out), and where the sign-in goes next."""

    accounts: tuple[tuple[str, int], ...]  # (user id, version)
    next_url: str


async def create_choice(pool: asyncpg.Pool, accounts: list[tuple[str, int]], next_url: str) -> str:
    """Returns the choice's key, for the browser alone: the table keeps its digest, never
    the password that was checked. Expired choices are swept on the way."""
    key = credentials.random_token(32)
    await pool.execute(
        "WITH swept AS (DELETE FROM sign_in_choices WHERE expires_at <= now()) "
        "INSERT INTO sign_in_choices (choice_hash, user_ids, versions, next_url, expires_at) "
        "VALUES ($1, $2, $3, $4, $5)",
        credentials.digest(key),
        [user_id for user_id, _ in accounts],
        [version for _, version in accounts],
        next_url,
        datetime.now(UTC) + CHOICE_LIFETIME,
    )
    return key


def _choice(row: asyncpg.Record | None) -> Choice | None:
    if row is None:
        return None
    return Choice(tuple(zip(row["user_ids"], row["versions"], strict=True)), row["next_url"])


async def peek_choice(pool: asyncpg.Pool, key: str) -> Choice | None:
    """The live choice behind `key`, left in place (the page that shows it)."""
    if not 20 <= len(key) <= 100:
        return None
    row = await pool.fetchrow(
        "SELECT user_ids, versions, next_url FROM sign_in_choices "
        "WHERE choice_hash = $1 AND expires_at > now()",
        credentials.digest(key),
    )
    return _choice(row)


async def take_choice(pool: asyncpg.Pool, key: str) -> Choice | None:
    """The live choice behind `key`, used up: a second answer finds nothing, in any
    process."""
    if not 20 <= len(key) <= 100:
        return None
    row = await pool.fetchrow(
        "DELETE FROM sign_in_choices WHERE choice_hash = $1 "
        "RETURNING user_ids, versions, next_url, expires_at > now() AS live",
        credentials.digest(key),
    )
    return _choice(row) if row is not None and row["live"] else None
