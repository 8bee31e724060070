"""The coalescing rules over an in-memory ledger: the first attempt per application, address
and window is recorded; the rest are counted and recorded as one summary per process."""

from __future__ import annotations

from service import events as ev
from service.alerts import CoalescingLedger
from service.domain import policy
from service.eventlog import ConcurrencyError, Metadata
from tests.unit import rules

META = Metadata(actor="client:client-1", client_ip="198.51.100.7")


class SharedLog:
    """Streams as the event log keeps them: an append at version 0 to a taken stream fails."""

    def __init__(self) -> None:
        self.streams: dict[str, list[ev.Event]] = {}
        self.appended: list[ev.Event] = []

    def ledger(self) -> InnerLedger:
        return InnerLedger(self)


class InnerLedger:
    def __init__(self, log: SharedLog) -> None:
        self.log = log

    async def record(self, record, meta, *, visible=False):
        stream = self.log.streams.setdefault(record.stream, [])
        if record.expected_version == 0 and stream:
            raise ConcurrencyError(record.stream, 0, len(stream))
        stream.extend(record.events)
        self.log.appended.extend(record.events)
        return [len(self.log.appended)]


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def violation(endpoint: str = "token") -> policy.Record:
    return policy.client_violation(rules.app(), "198.51.100.7", endpoint)


def test_only_signals_with_nothing_to_revoke_are_coalesced():
    assert policy.coalescable(violation()) is not None
    assert policy.coalescable(policy.old_secret_used(rules.app(), "198.51.100.7")) is not None
    revoked = ev.IpViolationDetected(
        company_id="c", client_id="x", ip="1.2.3.4", endpoint="api", token_revoked=True
    )
    assert policy.coalescable(policy.Record("token-f", 1, (revoked,))) is None


def test_windows_are_aligned_so_every_process_agrees():
    assert policy.window_start(1_800_000_899.9, 900) == 1_800_000_000
    assert policy.window_start(1_800_000_900.0, 900) == 1_800_000_900


async def test_one_event_per_window_and_one_summary_per_process_that_counted():
    log, clock = SharedLog(), Clock(1_800_000_000.5)
    a = CoalescingLedger(log.ledger(), 900, clock)  # type: ignore[arg-type]
    b = CoalescingLedger(log.ledger(), 900, clock)  # type: ignore[arg-type]
    for i in range(10):
        await (a, b)[i % 2].record(violation(), META)
    assert [type(e) for e in log.appended] == [ev.IpViolationDetected]
    clock.now += 900  # the next window: the next attempt records the summary first
    await a.record(violation("revoke"), META)
    await b.flush()
    types = [type(e).__name__ for e in log.appended]
    assert types == [
        "IpViolationDetected", "IpViolationsCoalesced", "IpViolationDetected",
        "IpViolationsCoalesced",
    ]  # fmt: skip
    counts = [e.count for e in log.appended if isinstance(e, ev.IpViolationsCoalesced)]
    assert sorted(counts) == [4, 5]
    assert a.counting == b.counting == 0
