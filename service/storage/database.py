"""Database wiring: which PostgreSQL to use, the connection pool, and `schema.sql`."""

from __future__ import annotations

from dataclasses import dataclass
from importlib.resources import files
from typing import TypeAlias

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from service.settings import ConfigError, Settings
from service.storage.embedded import EmbeddedPostgres

#: a connection, whether held directly or borrowed from a pool
Conn: TypeAlias = "asyncpg.Connection[asyncpg.Record] | PoolConnectionProxy[asyncpg.Record]"


def schema_sql() -> str:
    """`schema.sql`, shipped inside the package (a link to the repository's top-level file,
    which stays the one source), so an installed wheel finds it as an editable install does."""
    return files("service").joinpath("schema.sql").read_text(encoding="utf-8")


@dataclass
class Database:
    dsn: str
    pool: asyncpg.Pool
    embedded: EmbeddedPostgres | None = None

    async def close(self) -> None:
        await self.pool.close()
        if self.embedded is not None:
            self.embedded.stop()


def resolve_dsn(settings: Settings) -> tuple[str, EmbeddedPostgres | None]:
    """`DATABASE_URL` when set, else the embedded server under `DATA_DIR` (started here)."""
    if settings.database_url:
        return settings.database_url, None
    embedded = EmbeddedPostgres(settings.pg_dir)
    return embedded.start(), embedded


async def apply_schema(conn: Conn) -> None:
    """Apply `schema.sql`; every statement in it is idempotent."""
    await conn.execute(f"BEGIN;\n{schema_sql()}\nCOMMIT;")


async def open_database(settings: Settings, *, min_size: int = 2) -> Database:
    dsn, embedded = resolve_dsn(settings)
    try:
        try:
            pool = await create_pool(dsn, min_size=min_size, max_size=settings.pool_size)
        except ValueError as exc:  # a DATABASE_URL asyncpg cannot parse (port "x", ...)
            raise ConfigError(f"DATABASE_URL: {exc}") from None
        async with pool.acquire() as conn:
            await apply_schema(conn)
    except BaseException:
        if embedded is not None:
            embedded.stop()
        raise
    return Database(dsn, pool, embedded)


async def create_pool(dsn: str, *, min_size: int = 2, max_size: int = 10) -> asyncpg.Pool:
    pool = await asyncpg.create_pool(dsn, min_size=min_size, max_size=max_size)
    assert pool is not None
    return pool
