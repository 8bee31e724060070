"""METRICS_TOKEN: with it set, /metrics answers only a scraper that sends it."""

from __future__ import annotations

import pytest
from aiohttp.test_utils import TestClient, TestServer
from structlog.testing import capture_logs

from service.app import create_app
from service.settings import ConfigError, Settings, load_settings
from service.storage.database import Database

TOKEN = "m3trics-" + "7f3a9c0e41d2b6a8" * 2


async def test_metrics_need_the_bearer_token_when_one_is_set(db, tmp_path):
    settings = Settings(data_dir=tmp_path, log_format="json", metrics_token=TOKEN)
    client = TestClient(TestServer(create_app(settings, database=Database(db.dsn, db.pool))))
    await client.start_server()
    try:
        with capture_logs() as logs:
            missing = await client.get("/metrics")
            wrong = await client.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}x"})
            basic = await client.get("/metrics", headers={"Authorization": f"Basic {TOKEN}"})
            odd = await client.get("/metrics", headers={"Authorization": "Bearer \u00e9t\u00e9"})
            right = await client.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
            body = await right.text()
            twice = await client.get(  # one reader takes the first, another the last
                "/metrics",
                headers=[("Authorization", f"Bearer {TOKEN}"), ("Authorization", "Bearer x")],
            )
            health = await client.get("/healthz")  # the probes stay open
        for refused in (missing, wrong, basic, odd):
            assert refused.status == 401
            assert refused.headers["WWW-Authenticate"].startswith('Bearer realm="metrics"')
            assert (await refused.json())["error"] == "invalid_token"
            assert "tollgate_" not in await refused.text()
        assert 'error="invalid_token"' not in missing.headers["WWW-Authenticate"]
        assert right.status == 200
        assert twice.status == 400 and "tollgate_" not in await twice.text()
        assert "tollgate_tokens_issued_total" in body
        assert health.status == 200
        assert TOKEN not in repr(logs)
    finally:
        await client.close()


async def test_metrics_stay_open_without_a_token(client):
    assert (await client.get("/metrics")).status == 200


def test_a_short_metrics_token_is_refused_without_being_shown():
    with pytest.raises(ConfigError) as refused:
        load_settings({"METRICS_TOKEN": "short-secret"}, dotenv=False)
    assert str(refused.value).startswith("METRICS_TOKEN must be 16 or more")
    assert "short-secret" not in str(refused.value)
