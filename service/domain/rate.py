"""A rate per key (a token bucket): `rate` a second on average, `burst` at once. Memory is
bounded; the caller passes the time. Several processes share one rate by each taking what
it grants (`take`) and counting what the others granted as it hears of it (`taken`)."""

from __future__ import annotations

import math
from collections import OrderedDict

#: seconds the clocks of hosts sharing a log may be apart: what one host stamps a token
#: with is not read as the other's time
CLOCKS_APART = 60


class RateLimit:
    def __init__(self, rate: float, burst: int, max_keys: int = 100_000) -> None:
        self.rate = rate
        self.burst = burst
        self.max_keys = max_keys
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # (left, at)

    def take(self, key: str, now: float) -> int:
        """0 when `key` may go now (and one is taken), else the whole seconds to wait."""
        if self.rate <= 0:
            return 0
        left, at = self._buckets.get(key, (float(self.burst), now))
        left = min(float(self.burst), left + max(0.0, now - at) * self.rate)
        allowed = left >= 1.0
        self._keep(key, left - 1.0 if allowed else left, max(now, at))
        return 0 if allowed else max(1, math.ceil((1.0 - left) / self.rate))

    def taken(self, key: str, at: float) -> None:
        """One granted elsewhere, heard of at `at`: counted, never refused. What several
        processes granted at once before hearing of each other is a debt the bucket pays
        back at the rate (it goes below zero), so over time they grant no more than one
        would; at most a burst of it (a process that heard of minutes of grants at once,
        catching up, holds the client back for two bursts' time at most)."""
        if self.rate <= 0:
            return
        left, since = self._buckets.get(key, (float(self.burst), at))
        if at > since:  # heard late: the time never goes back
            left = min(float(self.burst), left + (at - since) * self.rate)
            since = at
        self._keep(key, max(-float(self.burst), left - 1.0), since)

    def _keep(self, key: str, left: float, at: float) -> None:
        self._buckets[key] = (left, at)
        self._buckets.move_to_end(key)
        # A key forgotten starts full again: the least recently seen go first, so the ones
        # held back now are the last to be forgotten.
        while len(self._buckets) > self.max_keys:
            self._buckets.popitem(last=False)
