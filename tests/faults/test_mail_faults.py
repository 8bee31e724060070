"""The mail server is down, then up, and one recipient greylists (451) beside a healthy
one, while clients load the service: every violation's email goes out in the end, the
healthy recipient's without waiting for the other's, and no acknowledged write is lost."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import asyncpg

from tests.faults.load import (
    FAULT_ENV,
    Tenant,
    check_the_log,
    load,
    tenant,
    usable_at_the_gateway,
)
from tests.faults.process import Service, kill_everything, start
from tests.integration.test_notifier import SmtpServer
from tests.integration.test_notifier_isolation import Greylisting

GREY = "ops@grey.example"
HEALTHY = "ops@healthy.example"
VIOLATIONS_EACH = 3


async def violate(service: Service, who: Tenant) -> None:
    """Tokens issued, then the allow list narrowed: each token used from here is a
    violation (its family revoked, an email to the application's addresses)."""
    base = service.base
    async with aiohttp.ClientSession() as http:
        tokens = []
        for _ in range(VIOLATIONS_EACH):
            async with http.post(
                f"{base}/oauth/token", data={"grant_type": "client_credentials"},
                headers=who.credentials,
            ) as r:  # fmt: skip
                assert r.status == 200
                tokens.append((await r.json())["access_token"])
        url = f"{base}/admin/applications/{who.application['client_id']}"
        async with http.patch(url, json={"ip_allowlist": ["192.0.2.1"]}, headers=who.admin) as r:
            assert r.status == 200
        for token in tokens:
            async with http.get(
                f"{base}/api/v1/whoami", headers={"Authorization": f"Bearer {token}"}
            ) as r:
                assert r.status == 403


def delivered(mailbox: Greylisting, address: str) -> int:
    return sum(address in rcpt for _, rcpt, _ in mailbox.received)


async def eventually(condition, seconds: float) -> float:
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < seconds, "the condition never held"
        await asyncio.sleep(0.1)
    return time.monotonic() - started


async def outcomes(service: Service) -> dict[str, int]:
    conn = await asyncpg.connect(service.embedded_dsn())
    try:
        rows = await conn.fetch(
            "SELECT type, count(*) AS n FROM events WHERE type LIKE 'IpViolation%'"
            " OR type LIKE 'ViolationNotification%' GROUP BY type"
        )
        sent = await conn.fetchval(
            "SELECT count(DISTINCT (payload->>'violation_position')) FROM events"
            " WHERE type = 'ViolationNotificationSent'"
        )
    finally:
        await conn.close()
    return {**{r["type"]: r["n"] for r in rows}, "distinct_sent": sent}


async def test_smtp_down_then_up_and_a_greylisting_recipient_beside_a_healthy_one(
    tmp_path, figures
):
    smtp = SmtpServer()  # its port is reserved; nothing listens yet: the server is down
    mailbox = Greylisting()
    mailbox.greylisted = frozenset({GREY})
    smtp.mailbox = mailbox
    env = {**FAULT_ENV, "SMTP_HOST": "127.0.0.1", "SMTP_PORT": str(smtp.port)}
    service = start(tmp_path / "data", **env, NOTIFY_RETRY_MAX="1", MAIL_FROM="t@alerts.example")
    try:
        await service.wait_status(200, 90)
        who = await tenant(service)
        grey = await tenant(service, "Grey", notification_emails=[GREY])
        healthy = await tenant(service, "Healthy", notification_emails=[HEALTHY])

        async def mail_faults() -> None:
            await asyncio.gather(violate(service, grey), violate(service, healthy))
            await asyncio.sleep(3)  # attempts fail against a closed port
            await smtp.start()
            # The healthy recipient's emails go while the other one's are refused.
            await eventually(lambda: delivered(mailbox, HEALTHY) >= VIOLATIONS_EACH, 30)
            assert delivered(mailbox, GREY) == 0 and mailbox.refused
            mailbox.greylisted = frozenset()

        tally, _ = await asyncio.gather(load(service.base, who, seconds=12), mail_faults())
        await eventually(lambda: delivered(mailbox, GREY) >= VIOLATIONS_EACH, 30)
        seen = await outcomes(service)
        assert seen["IpViolationDetected"] == 2 * VIOLATIONS_EACH
        assert seen["distinct_sent"] == 2 * VIOLATIONS_EACH
        assert seen.get("ViolationNotificationFailed", 0) > 0
        assert "ViolationNotificationAbandoned" not in seen
        assert not [s for s in tally.statuses if isinstance(s, int) and s >= 500]
        await usable_at_the_gateway(service.base, tally.tokens)
        assert service.stop() == 0
        figures.update(
            await check_the_log(service, tally),
            emails_sent=len(mailbox.received),
            greylisted_refusals=len(mailbox.refused),
            notification_events=seen,
            answers=dict(tally.statuses),
        )
    finally:
        kill_everything(service)
        await smtp.stop()
