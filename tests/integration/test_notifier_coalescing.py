"""A flood of violations with nothing to revoke is one email per application, address and
window (VIOLATION_WINDOW), over a real SMTP server (aiosmtpd on loopback), and each email
says how many attempts it covers."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from service.settings import Settings
from tests.e2e.oauth_helpers import basic, new_app
from tests.integration.test_notifier import SmtpServer

WINDOW = 2
CC = {"grant_type": "client_credentials"}


@pytest.fixture
async def smtp():
    server = SmtpServer()
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture
def settings(tmp_path, smtp):
    return Settings(
        data_dir=tmp_path,
        log_format="json",
        smtp_host="127.0.0.1",
        smtp_port=smtp.port,
        mail_from="tollgate@alerts.example",
        violation_window=WINDOW,
    )


async def mails(smtp: SmtpServer, count: int, within: float = 10.0):
    deadline = time.monotonic() + within
    while len(smtp.mailbox.messages) < count and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    return smtp.mailbox.messages


def text(message) -> str:
    return message.get_content().replace("\r\n", "\n")


async def next_window() -> None:
    await asyncio.sleep(WINDOW - time.time() % WINDOW + 0.05)


async def test_a_flood_of_violations_is_one_email_per_window_that_counts_the_attempts(
    client, company, db, smtp
):
    app = await new_app(client, company, ip_allowlist=["192.0.2.0/24"])
    creds = basic(app["client_id"], app["client_secret"])
    await next_window()
    for _ in range(10):
        assert (await client.post("/oauth/token", data=CC, headers=creds)).status == 403
    [first] = await mails(smtp, 1)
    body = text(first)
    assert "Attempts:     1\n" in body
    assert "every 2 seconds (VIOLATION_WINDOW)" in " ".join(body.split())
    assert "attempts)" not in first["Subject"]
    await next_window()
    assert (await client.post("/oauth/token", data=CC, headers=creds)).status == 403
    messages = await mails(smtp, 2)
    await asyncio.sleep(WINDOW)  # nothing else follows: the counts are not mailed again
    assert len(smtp.mailbox.messages) == 2
    second = messages[1]
    assert second["Subject"].endswith("(10 attempts)")
    assert "Attempts:     10: this one, and 9 counted since the" in text(second)
    assert app["client_secret"] not in second.as_string()
    sent = await db.pool.fetch(
        "SELECT payload FROM events WHERE type = 'ViolationNotificationSent' ORDER BY position"
    )
    assert len(sent) == 2
    summaries = await db.pool.fetch(
        "SELECT payload FROM events WHERE type = 'IpViolationsCoalesced'"
    )
    assert [json.loads(s["payload"])["count"] for s in summaries] == [9]
