"""Feeds the in-memory models from the event log: on demand (a miss, or a request that
must see its own write) and by following the log's notifications."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import time
from collections.abc import Sequence
from typing import Protocol

import structlog

from service.eventlog import EventLog, EventLogUnavailable, RecordedEvent, decode_lean
from service.eventlog.records import lean_recorded
from service.events import SCHEMA_VERSIONS, Event, type_of
from service.logs import error_text
from service.storage.database import view_clock, within

log = structlog.get_logger(__name__)

COMPACT_EVERY = 300.0  # seconds between compactions (dropped keys, spent codes)
#: announced batches kept while one before them is on its way (each under 8000 bytes)
MAX_AHEAD = 256
#: what a round trip on the listener's session says less: a commit signals the listening
#: sessions a moment after it becomes visible (a writer descheduled between the two), and
#: one whose signal had not arrived when the round trip began is not covered by it
LISTEN_MARGIN = 1.0


class Model(Protocol):
    position: int

    def apply(self, events: Sequence[RecordedEvent]) -> None: ...


class MemoryFeed:
    """Keeps in-memory models current from the log; `wait_for(position)` gives a request
    read-your-writes: what this process just appended is visible to its next request."""

    def __init__(
        self, eventlog: EventLog, models: Sequence[Model], *, batch_size: int = 5000
    ) -> None:
        self.eventlog = eventlog
        self.models = list(models)
        self.position = min((m.position for m in self.models), default=0)
        self.batch_size = batch_size
        self._catch_up_lock = asyncio.Lock()
        self._next: asyncio.Future[int] | None = None
        self._task: asyncio.Task[None] | None = None
        #: batches announced ahead of what the models hold, by first position: another
        #: process's commit whose notification came before the answer to this process's
        #: own commit just before it (two connections, either may be read first)
        self._ahead: dict[int, tuple[int, str]] = {}
        #: a moment (view_clock()) before which the models hold everything committed:
        #: when the last read that reached the head began, or a listener's round trip
        #: that vouches for them (heard). Announcements and this process's own appends
        #: move the models on, but say nothing of what else may have committed.
        self.current_at = -math.inf
        eventlog.appended.append(self.apply_own)
        eventlog.announced.append(self.apply_announced)
        eventlog.heard.append(self.heard)

    async def catch_up(self) -> int:
        """Apply everything committed so far.

        Callers that arrive while a catch-up runs share the next one (which starts after
        it and so sees whatever they are looking for): any number of concurrent misses
        cost at most two reads.
        """
        if self._next is None:
            self._next = asyncio.ensure_future(self._catch_up_after_current())
            # Its callers may all be gone when it fails (shutting down): the failure is
            # theirs to see, not an "exception was never retrieved" on the way out.
            self._next.add_done_callback(_retrieved)
        return await asyncio.shield(self._next)

    async def _catch_up_after_current(self) -> int:
        async with self._catch_up_lock:
            self._next = None  # from here on, newcomers need a read that starts later
            return await self._read_and_apply()

    async def _read_and_apply(self) -> int:
        # The next batch is fetched while the current one is applied, so the database and
        # this process work side by side. A batch shorter than a full one reached the head
        # the read saw (positions are dense and follow commit order), so nothing is read
        # after it: following the log, most catch-ups are one short batch, and the read
        # after it came back empty (half the reads of a process following another's).
        read = self.eventlog.read_all
        began = view_clock()
        batch = await read(self.position, self.batch_size, lean=True)
        while batch:
            upcoming = None
            if len(batch) == self.batch_size:
                upcoming = asyncio.ensure_future(
                    read(batch[-1].position, self.batch_size, lean=True)
                )
                await asyncio.sleep(0)  # let it send the query before applying takes the CPU
            try:
                if batch[0].position <= self.position:  # applied meanwhile (apply_own)
                    batch = [r for r in batch if r.position > self.position]
                if batch:
                    for model in self.models:
                        model.apply(batch)
                    self.position = batch[-1].position
                    self._apply_ahead()
            except BaseException:
                if upcoming is not None:
                    upcoming.cancel()
                raise
            batch = await upcoming if upcoming is not None else []
        self.current_at = max(self.current_at, began)
        return self.position

    def heard(self, began: float, head: int) -> None:
        """The listener's session answered a round trip begun at `began`, the log's head
        then being `head` (EventLog.heard): when the models hold that head, they hold
        everything committed before `began`, less LISTEN_MARGIN. So a process whose reads
        wait (its pool taken by a burst of requests) but that hears every commit stays
        current, and one whose listener goes quiet does not."""
        if self.position >= head:
            self.current_at = max(self.current_at, began - LISTEN_MARGIN)

    def current_within(self, max_age: float) -> bool:
        """Whether the models hold everything committed more than `max_age` seconds ago."""
        return view_clock() - self.current_at <= max_age

    async def made_current(self, max_age: float) -> bool:
        """Returns once the models hold everything committed more than `max_age` seconds
        ago: at once when they do (False), after a read that began after this call when
        they do not (True: a process that was paused, or starved, or could not read the
        log); EventLogUnavailable when that read does not succeed within the log's bound
        (5 s without one). Decisions taken from memory then stay within a known distance
        of the log: a revocation committed elsewhere is enforced here within `max_age`
        seconds, or nothing is decided."""
        if self.current_within(max_age):
            return False
        patience = self.eventlog.timeout or 5.0
        try:
            await within(patience, self.catch_up())
        except TimeoutError:
            raise EventLogUnavailable(f"the log was not read within {patience:g} s") from None
        return True

    def apply_own(
        self, positions: Sequence[int], expected_version: int | None, events: Sequence[Event]
    ) -> bool:
        """Apply events this process has just committed, as a read would bring them back,
        when they directly follow what the models hold: positions are handed out in commit
        order under the log's lock, so nothing committed elsewhere lies in between, and
        reading them back would cost a round trip and a decode for what is already here.
        Their versions must be known (the append named its expected version). False: not
        applied, the next read brings them."""
        if expected_version is None or not positions or positions[0] != self.position + 1:
            return False
        try:
            recorded = []
            versions = itertools.count(expected_version + 1)
            for position, version, event in zip(positions, versions, events, strict=False):
                tag = type_of(event)
                recorded.append(lean_recorded(position, version, tag, SCHEMA_VERSIONS[tag], event))
            for model in self.models:
                model.apply(recorded)
        except Exception:
            # As when a read's batch fails to apply: logged, and left to the next read.
            log.exception("memory_feed.apply_error", position=positions[0])
            return False
        self.position = positions[-1]
        self._apply_ahead()
        return True

    def apply_announced(self, first: int, last: int, events: str) -> None:
        """Apply a batch another process committed, from the notification its commit sent
        (`events_append_batch`), when it directly follows what the models hold: notifications
        arrive in commit order, and positions follow it. What is already here (this
        process's own, applied by `apply_own`) is skipped before anything is decoded; a
        batch after a gap (one too large to be announced, a notification lost) is left to
        the read its head's notification starts, but one that follows a batch this process
        is about to hear of (its own commit, answered a moment later) is kept until then."""
        if first != self.position + 1:
            if first > self.position + 1 and len(self._ahead) < MAX_AHEAD:
                self._ahead[first] = (last, events)
            return
        if self._apply_announced(first, last, events):
            self._apply_ahead()

    def _apply_ahead(self) -> None:
        ahead = self._ahead
        while ahead:
            following = ahead.pop(self.position + 1, None)
            if following is None:
                for first in [f for f in ahead if f <= self.position]:
                    del ahead[first]  # a read brought it meanwhile
                return
            if not self._apply_announced(self.position + 1, *following):
                return

    def _apply_announced(self, first: int, last: int, events: str) -> bool:
        try:
            batch = decode_lean(events)
            if not batch or batch[0].position != first or batch[-1].position != last:
                raise ValueError(f"announced {first}-{last}, carried {len(batch)} events")
            for model in self.models:
                model.apply(batch)
        except Exception:
            log.exception("memory_feed.apply_error", position=first)
            self._ahead.clear()  # left to the read
            return False
        self.position = last
        return True

    async def wait_for(self, position: int) -> None:
        """Until the models have applied `position`; EventLogUnavailable once the log's
        own bound (5 s without one) has passed with no progress, so that a request never
        waits on a log it cannot read."""
        patience = self.eventlog.timeout or 5.0
        deadline = time.monotonic() + patience
        while self.position < position:
            before = self.position
            await self.catch_up()
            if self.position >= position:
                return
            if self.position > before:
                deadline = time.monotonic() + patience
            elif time.monotonic() > deadline:
                raise EventLogUnavailable(f"position {position} was not readable in {patience:g} s")
            else:
                await asyncio.sleep(0.01)

    async def start(self) -> None:
        await self.catch_up()
        self._task = asyncio.create_task(self._follow(), name="memory-feed")

    async def close(self) -> None:
        with contextlib.suppress(ValueError):
            self.eventlog.appended.remove(self.apply_own)
        with contextlib.suppress(ValueError):
            self.eventlog.announced.remove(self.apply_announced)
        with contextlib.suppress(ValueError):
            self.eventlog.heard.remove(self.heard)
        for pending in (self._task, self._next):
            if pending is not None:
                pending.cancel()
                with contextlib.suppress(asyncio.CancelledError, EventLogUnavailable):
                    await pending

    async def _follow(self) -> None:
        compacted = time.monotonic()
        while True:
            try:
                await self.catch_up()
            except EventLogUnavailable as exc:
                log.warning("memory_feed.catch_up_failed", error=error_text(exc))
            except Exception:
                # A bug, or an event the models cannot apply: keep following what can be
                # applied rather than freeze every decision of this process.
                log.exception("memory_feed.catch_up_error")
                await asyncio.sleep(1.0)
            now = time.time()
            for model in self.models:
                sweep = getattr(model, "sweep", None)
                if sweep is not None:
                    sweep(now)
            if time.monotonic() - compacted > COMPACT_EVERY:
                compacted = time.monotonic()
                for model in self.models:
                    compact = getattr(model, "compact", None)
                    if compact is not None:
                        compact(now)
            await self._next_news()

    async def _next_news(self) -> None:
        """Until the log has grown past what the models hold, or a poll is due (a
        notification can be lost). What this process applied itself (apply_own) is no
        news: no read for it."""
        wakeup, patience = self.eventlog.wakeup, self.eventlog.poll_interval
        deadline = time.monotonic() + patience
        while True:
            await wakeup.wait(self.position, max(deadline - time.monotonic(), 0.0))
            if wakeup.head > self.position or time.monotonic() >= deadline:
                return


def _retrieved(future: asyncio.Future[int]) -> None:
    if not future.cancelled():
        future.exception()
