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
