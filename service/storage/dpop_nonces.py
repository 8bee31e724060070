"""DPoP server nonces (RFC 9449 §8) in PostgreSQL, so that a nonce handed out by any process
on any host is accepted by every other.

Each process hands out one current nonce and replaces it once a third of its lifetime has
passed (service/domain/dpop_nonces.py). A new nonce's SHA-256 digest and expiry are inserted
before the nonce is handed out, so a client can never hold a nonce the table does not know.
A proof's nonce is accepted when its digest is known here (this process's own, or one looked
up before) and unexpired; an unknown one costs one lookup by primary key, under the pool's
bounds (DB_TIMEOUT: a database that does not answer is a 503, as for every other read), and
what it finds is remembered. Expired rows are pruned with each insert. The table holds
digests only: nothing in it can be put in a proof.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import asyncpg

from service.domain import dpop_nonces

_INSERT = """
WITH pruned AS (DELETE FROM dpop_nonces WHERE expires_at < now())
INSERT INTO dpop_nonces (digest, expires_at) VALUES ($1, to_timestamp($2))
ON CONFLICT (digest) DO NOTHING
"""

_LOOKUP = "SELECT extract(epoch FROM expires_at)::float8 FROM dpop_nonces WHERE digest = $1"


class DpopNonces:
    def __init__(
        self,
        pool: asyncpg.Pool,
        lifetime: float,
        *,
        clock: Callable[[], float] = time.time,
        remember: int = 4096,
    ) -> None:
        self.pool = pool
        self.lifetime = lifetime
        self.clock = clock
        self.remember = remember
        self._current: tuple[str, float] | None = None  # the nonce, when it was made
        #: digest -> expiry: this process's nonces and those it looked up
        self._known: dict[bytes, float] = {}
        self._rotating = asyncio.Lock()

    async def current(self) -> str:
        """The nonce to hand out now: made (and stored) when the one before is due."""
        held = self._current
        if held is not None and not dpop_nonces.rotation_due(held[1], self.clock(), self.lifetime):
            return held[0]
        async with self._rotating:  # one new nonce, however many requests found it due
            held, now = self._current, self.clock()
            if held is not None and not dpop_nonces.rotation_due(held[1], now, self.lifetime):
                return held[0]
            nonce = dpop_nonces.new_nonce()
            digest, expires_at = dpop_nonces.digest(nonce), now + self.lifetime
            await self.pool.execute(_INSERT, digest, expires_at)
            self._keep(digest, expires_at, now)
            self._current = (nonce, now)
            return nonce

    async def expires_at(self, nonce: str) -> float | None:
        """When `nonce` stops being accepted; None: no process handed it out (or its row,
        long expired, has been pruned)."""
        digest = dpop_nonces.digest(nonce)
        known = self._known.get(digest)
        if known is not None:
            return known
        found = await self.pool.fetchval(_LOOKUP, digest)
        if found is None:
            return None
        self._keep(digest, float(found), self.clock())
        return float(found)

    def _keep(self, digest: bytes, expires_at: float, now: float) -> None:
        """Remember a digest's expiry; the expired go first when the memory is full, then
        the oldest remembered."""
        if len(self._known) >= self.remember:
            self._known = {d: e for d, e in self._known.items() if e > now}
            while len(self._known) >= self.remember:
                del self._known[next(iter(self._known))]
        self._known[digest] = expires_at
