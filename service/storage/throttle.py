"""Failed sign-ins, counted in PostgreSQL: every process and every host shares one limit,
so `--workers N` or N hosts do not allow N times the guesses.

Each key (the lower-cased email with the caller's address, or with `*`) has a fixed window
that opens with its first failure: `max_failures` failures are allowed in it, and the key
is refused until it ends. One statement checks and counts every key of an attempt
(`INSERT ... ON CONFLICT DO UPDATE ... RETURNING`): the row lock it takes makes concurrent
attempts, in any process, meet the limit as a sequence would. A key at its limit is
marked, not counted further (`failures = max_failures + 1`), so a refused attempt never
extends the window. Rows whose window has passed are pruned.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime

import asyncpg

_ATTEMPT = """
INSERT INTO sign_in_failures AS f (key, max_failures, failures, window_start)
SELECT u.key, u.max_failures, 1, now()
FROM unnest($1::text[], $2::integer[]) AS u(key, max_failures)
ON CONFLICT (key) DO UPDATE SET
    window_start = CASE WHEN f.window_start <= now() - make_interval(secs => $3)
                        THEN now() ELSE f.window_start END,
    failures = CASE WHEN f.window_start <= now() - make_interval(secs => $3) THEN 1
                    ELSE least(f.failures + 1, EXCLUDED.max_failures + 1) END,
    max_failures = EXCLUDED.max_failures
RETURNING f.key, f.window_start, f.failures <= f.max_failures AS counted,
          extract(epoch FROM f.window_start + make_interval(secs => $3) - now()) AS remaining
"""

_WITHDRAW = """
UPDATE sign_in_failures AS f SET failures = f.failures - 1
FROM unnest($1::text[], $2::timestamptz[]) AS u(key, window_start)
WHERE f.key = u.key AND f.window_start = u.window_start AND f.failures > 0
"""

_PRUNE = "DELETE FROM sign_in_failures WHERE window_start <= now() - make_interval(secs => $1)"


@dataclass(frozen=True)
class Attempt:
    """One sign-in attempt as the throttle saw it: `retry_after` seconds to wait (0: it may
    go on), and the failures counted for it (key, window), to take back on success."""

    retry_after: float
    counted: tuple[tuple[str, datetime], ...]


class SignInThrottle:
    def __init__(
        self,
        pool: asyncpg.Pool,
        *,
        limit: int = 5,
        window: float = 900.0,
        prune_every: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.pool = pool
        self.limit = limit
        self.window = window
        self.prune_every = prune_every
        self.clock = clock
        self._pruned_at: float | None = None

    async def attempt(self, keys: Sequence[tuple[str, int]]) -> Attempt:
        """Count one failure against each (key, limit) before the (slow) password check, so
        that a burst of concurrent attempts meets the limit as a sequence would. Refused
        when any key is at its limit; then nothing stays counted against the others."""
        await self._prune()
        rows = await self.pool.fetch(
            _ATTEMPT, [k for k, _ in keys], [limit for _, limit in keys], float(self.window)
        )
        counted = tuple((r["key"], r["window_start"]) for r in rows if r["counted"])
        refused = [float(r["remaining"]) for r in rows if not r["counted"]]
        if refused:
            await self.withdraw(Attempt(0.0, counted))
            return Attempt(max(1.0, *refused), ())
        return Attempt(0.0, counted)

    async def withdraw(self, attempt: Attempt) -> None:
        """Take back the failures counted for an attempt that then succeeded (or was
        refused): only in the window they were counted in."""
        if attempt.counted:
            await self.pool.execute(
                _WITHDRAW, [k for k, _ in attempt.counted], [w for _, w in attempt.counted]
            )

    async def _prune(self) -> None:
        now = self.clock()
        if self._pruned_at is not None and now - self._pruned_at < self.prune_every:
            return
        self._pruned_at = now
        await self.pool.execute(_PRUNE, float(self.window))
