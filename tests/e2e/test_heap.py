"""The served process's garbage collector: it rarely looks at young objects, and never at
what existed once the service had started."""

from __future__ import annotations

import asyncio
import gc

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from service.web.server import GC_THRESHOLD, settle_heap
from tests.e2e.oauth_helpers import basic
from tests.e2e.test_logs import credentials, serving

TOKENS = 1500


async def _collections(http: aiohttp.ClientSession) -> dict[str, float]:
    async with http.get("/metrics") as response:
        text = await response.text()
    return {
        sample.labels["generation"]: sample.value
        for family in text_string_to_metric_families(text)
        if family.name == "python_gc_collections"
        for sample in family.samples
    }


async def test_issuing_tokens_rarely_wakes_the_garbage_collector(db, tmp_path):
    # At CPython's default threshold (700) these requests cost about one collection of
    # the young generation every 25 to 40 tokens (41 here in one run), each re-examining what the
    # requests in flight hold.
    # One client's flood: without its rate limit, and without superseding its oldest tokens.
    async with serving(db, tmp_path, TOKEN_RATE_PER_CLIENT="0", CC_TOKEN_LIMIT="0") as running:
        c = await credentials(db, tmp_path, running)
        headers = basic(c.client_id, c.client_secret)
        async with aiohttp.ClientSession(f"http://127.0.0.1:{running.port}") as http:
            before = await _collections(http)
            assert set(before) == {"0", "1", "2"}

            async def issue(count: int) -> None:
                for _ in range(count):
                    async with http.post(
                        "/oauth/token", data={"grant_type": "client_credentials"},
                        headers=headers,
                    ) as response:  # fmt: skip
                        assert response.status == 200, await response.text()

            await asyncio.gather(*(issue(TOKENS // 30) for _ in range(30)))
            after = await _collections(http)
    young = after["0"] - before["0"]
    assert young <= 5, f"{young:.0f} collections of the young generation for {TOKENS} tokens"


def test_what_exists_once_started_is_out_of_the_collectors_reach():
    assert GC_THRESHOLD[0] > gc.get_threshold()[0]  # this test process keeps the default
    kept = [object() for _ in range(10)]
    try:
        settle_heap()
        assert gc.get_freeze_count() > len(kept)
    finally:
        gc.unfreeze()
