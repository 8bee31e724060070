"""Admin writers changing one application at once without If-Match: no precondition was
sent, so none can fail; every change lands on top of the others."""

from __future__ import annotations

import asyncio
import collections
import itertools

from tests.e2e.oauth_helpers import new_app

WRITERS = 4
PATCHES = 40  # each


async def test_concurrent_patches_without_if_match_never_get_412(client, company):
    app = await new_app(client, company)
    path = f"/admin/applications/{app['client_id']}"
    statuses: collections.Counter[int] = collections.Counter()

    async def writer(n: int) -> None:
        for i in range(PATCHES):
            response = await client.patch(
                path, json={"name": f"writer {n} change {i}"}, headers=company.auth
            )
            await response.read()
            statuses[response.status] += 1

    await asyncio.gather(*(writer(n) for n in range(WRITERS)))
    assert statuses == {200: WRITERS * PATCHES}, statuses
    final = await (await client.get(path, headers=company.auth)).json()
    history = await client.get("/admin/events", params={"limit": "1000"}, headers=company.auth)
    renamed = [e for e in (await history.json())["events"] if e["type"] == "ApplicationRenamed"]
    assert len(renamed) == WRITERS * PATCHES  # no change lost, none applied twice
    # each applied on top of the one before it
    assert all(
        b["payload"]["before"] == a["payload"]["after"] for a, b in itertools.pairwise(renamed)
    )
    assert final["name"] == renamed[-1]["payload"]["after"]


async def test_concurrent_kill_switches_never_get_412(client, company):
    """Many revoke-tokens at once on one application: none sent a precondition, so none
    is told one failed (a 412 said so, to 9 of 60 across two processes)."""
    app = await new_app(client, company)
    path = f"/admin/applications/{app['client_id']}/revoke-tokens"

    async def switch() -> int:
        response = await client.post(path, headers=company.auth)
        await response.read()
        return response.status

    statuses = collections.Counter(await asyncio.gather(*(switch() for _ in range(30))))
    assert set(statuses) <= {200, 409}, statuses
    assert statuses[200] >= 1


async def test_changed_at_every_attempt_without_a_precondition_is_409_with_retry_after(
    client, company, monkeypatch
):
    """Still changing after every attempt: a 409 the client may retry, for the kill switch
    and a user's role alike (they answered 412, for a condition never sent)."""
    from service.app import CONTEXT
    from service.eventlog import ConcurrencyError

    app = await new_app(client, company)
    ctx = client.app[CONTEXT]

    async def always_raced(stream, version, events, meta, **kw):
        raise ConcurrencyError(stream, version, version + 1)

    monkeypatch.setattr(ctx, "record", always_raced)
    response = await client.post(
        f"/admin/applications/{app['client_id']}/revoke-tokens", headers=company.auth
    )
    assert response.status == 409, await response.text()
    assert response.headers["Retry-After"] == "1"
    assert (await response.json())["error"] == "conflict"
