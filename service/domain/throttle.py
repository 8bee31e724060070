"""Failed sign-ins slow down guessing: after `limit` failures within `window` seconds for
one key, that key is refused until the window has passed. Memory is bounded."""

from __future__ import annotations

from collections import OrderedDict, deque


class Throttle:
    def __init__(self, limit: int = 5, window: float = 900.0, max_keys: int = 100_000) -> None:
        self.limit = limit
        self.window = window
        self.max_keys = max_keys
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()

    def retry_after(self, key: str, now: float, limit: int | None = None) -> float:
        """Seconds until `key` may try again; 0 when it may now."""
        limit = limit or self.limit
        failures = self._recent(key, now)
        if len(failures) < limit:
            return 0.0
        return max(0.0, failures[len(failures) - limit] + self.window - now)

    def failed(self, key: str, now: float) -> None:
        failures = self._recent(key, now)
        failures.append(now)
        self._failures[key] = failures
        self._failures.move_to_end(key)
        while len(self._failures) > self.max_keys:
            self._failures.popitem(last=False)

    def succeeded(self, key: str) -> None:
        self._failures.pop(key, None)

    def withdraw(self, key: str, when: float) -> None:
        """Take back one failure counted at `when` (an attempt counted before its outcome
        was known, that then succeeded)."""
        failures = self._failures.get(key)
        if failures is not None and when in failures:
            failures.remove(when)

    def _recent(self, key: str, now: float) -> deque[float]:
        failures = self._failures.get(key, deque())
        while failures and failures[0] <= now - self.window:
            failures.popleft()
        return failures
