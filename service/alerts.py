"""Refused attempts that can be repeated for ever, coalesced: one event per application,
address and window, and a count.

A valid secret from a disallowed address, or a rotated-away secret, kills nothing that an
attacker cannot present again, so without this each request would append an event (and
send an email). `CoalescingLedger` sits in front of the ledger every path records through
(`policy.coalescable` says which records it takes; everything else passes through):

- the first attempt per (application, address) in each VIOLATION_WINDOW is recorded as
  before, at version 0 of the window's own stream, so across processes exactly one is;
  a process that finds the stream taken knows the window is open;
- later attempts in the window are counted in this process, per endpoint, and recorded as
  one summary (`IpViolationsCoalesced`, `OldClientSecretUsesCoalesced`: how many, the first
  and the last) when the window closes, or on the next attempt after it, or when the
  process stops. Each process that counted records its own summary: at most one per
  process, window and endpoint. A process that dies unexpectedly loses its counts (the
  first attempt is in the log already).

The observers (security log lines, metrics) still see every attempt.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass

import structlog

from service.adapters import LogLedger, Observer
from service.domain import policy
from service.domain.grants import Record
from service.eventlog import ConcurrencyError, EventLogError, Metadata
from service.logs import error_text

log = structlog.get_logger(__name__)


@dataclass
class _Tally:
    signal: policy.Signal  # the latest attempt: who, from where, where
    meta: Metadata  # the latest attempt's request: the summary's metadata
    start: int
    count: int
    first_at: float
    last_at: float


class CoalescingLedger(LogLedger):
    """A LogLedger in front of another: it records through `inner` (not a second writer),
    and is one so that everything that holds the context's ledger goes through it."""

    def __init__(
        self,
        inner: LogLedger,
        window: int,
        clock: Callable[[], float],
        observers: Sequence[Observer] = (),
    ) -> None:
        # No super().__init__(): every append goes through `inner`, which has the log.
        self._inner = inner
        self.window = window
        self.clock = clock
        self._observers = tuple(observers)
        self._open: dict[str, int] = {}  # window streams known to be taken → window start
        self._tallies: dict[tuple[str, str], _Tally] = {}  # (stream, endpoint) → count
        self._flushing = asyncio.Lock()
        self._swept = 0  # the window as of which nothing older is left to record

    async def record(self, record: Record, meta: Metadata, *, visible: bool = False) -> list[int]:
        signal = policy.coalescable(record)
        if signal is None:
            return await self._inner.record(record, meta, visible=visible)
        now = self.clock()
        await self.flush(now)  # the window before this one closed: its summary goes first
        start = policy.window_start(now, self.window)
        first = policy.first_in_window(signal, start)
        if first.stream not in self._open:
            try:
                positions = await self._inner.record(first, meta, visible=visible)
            except ConcurrencyError as exc:
                if exc.stream_id != first.stream:
                    raise
                # Another process (or this one, before a restart) recorded the first.
            else:
                self._open[first.stream] = start
                return positions
            self._open[first.stream] = start
        self._count(first.stream, signal, meta, start, now)
        for observe in self._observers:
            observe((signal,))
        return []

    async def wait_for(self, position: int) -> None:
        await self._inner.wait_for(position)

    def _count(
        self, stream: str, signal: policy.Signal, meta: Metadata, start: int, now: float
    ) -> None:
        key = (stream, policy.signal_key(signal))
        tally = self._tallies.get(key)
        if tally is None:
            self._tallies[key] = _Tally(signal, meta, start, 1, now, now)
        else:
            tally.signal, tally.meta = signal, meta
            tally.count, tally.last_at = tally.count + 1, now

    @property
    def counting(self) -> int:
        """Attempts counted and not recorded yet."""
        return sum(tally.count for tally in self._tallies.values())

    def next_close(self) -> float | None:
        """When the earliest window with a count closes (unix seconds), if any."""
        starts = [tally.start for tally in self._tallies.values()]
        return min(starts) + self.window if starts else None

    async def flush(self, now: float | None = None, *, everything: bool = False) -> None:
        """Record the summary of every window that has closed (every window, when the
        process stops). A summary that cannot be recorded now is kept for the next flush."""
        current = policy.window_start(self.clock() if now is None else now, self.window)
        if current == self._swept and not everything:
            return  # the common case, on every attempt: nothing has closed since
        async with self._flushing:
            self._open = {s: start for s, start in self._open.items() if start >= current}
            deferred = False
            for key, tally in list(self._tallies.items()):
                if tally.start >= current and not everything:
                    continue
                record = policy.coalesced(
                    tally.signal, tally.count, tally.first_at, tally.last_at, tally.start,
                    self.window,
                )  # fmt: skip
                try:
                    await self._inner.record(record, tally.meta)
                except EventLogError as exc:
                    log.warning("alerts.summary_deferred", count=tally.count, error=error_text(exc))
                    deferred = True
                    continue
                del self._tallies[key]
            if not deferred:
                self._swept = current

    async def run(self, poll: float = 1.0) -> None:
        """Record each window's summary soon after it closes, even if no attempt follows."""
        while True:
            due, now = self.next_close(), self.clock()
            # A window that closed and is still counted was deferred: try again in `poll`.
            await asyncio.sleep(poll if due is None or due <= now else min(poll, due - now))
            try:
                await self.flush()
            except Exception as exc:  # the next round tries again; only cancel stops it
                log.warning("alerts.flush_failed", error=error_text(exc))


@contextlib.asynccontextmanager
async def running(ledger: CoalescingLedger, poll: float = 1.0) -> AsyncIterator[None]:
    """The summaries recorded as windows close, and whatever is counted when it stops."""
    task = asyncio.create_task(ledger.run(poll), name="alerts")
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        with contextlib.suppress(EventLogError):
            await ledger.flush(everything=True)
        if ledger.counting:
            log.warning("alerts.counts_lost", count=ledger.counting)
