"""The feed that keeps in-memory models current: what it forgets as time passes."""

from __future__ import annotations

import asyncio
import time

from projections import feed as feed_module
from projections.feed import MemoryFeed
from projections.memory import PolicyModel
from service import events as ev
from service.eventlog import EventLog


def code(n: int, expires_at: int) -> ev.AuthorizationCodeIssued:
    return ev.AuthorizationCodeIssued(
        company_id="c1",
        client_id="app-1",
        user_id="u1",
        code_hash=f"{n:064x}",
        redirect_uri="https://app.example/cb",
        permissions=["invoices:read"],
        code_challenge=None,
        expires_at=expires_at,
    )


async def test_the_feed_forgets_codes_past_their_reuse_window(eventlog: EventLog, monkeypatch):
    now = int(time.time())
    await eventlog.append("code-old", 0, [code(1, now - 2 * 3600)])  # expired 2 h ago
    await eventlog.append("code-new", 0, [code(2, now + 600)])
    monkeypatch.setattr(feed_module, "COMPACT_EVERY", 0.0)
    model = PolicyModel()
    feed = MemoryFeed(eventlog, [model])
    await feed.start()
    try:
        for _ in range(100):
            if f"{1:064x}" not in model.codes:
                break
            await asyncio.sleep(0.05)
    finally:
        await feed.close()
    assert f"{1:064x}" not in model.codes  # a process that runs for months stays small
    assert f"{2:064x}" in model.codes
