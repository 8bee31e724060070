"""client_credentials applications keep the seed's promise: an allow list no broader than
ALLOWLIST_MIN_PREFIX_V4/_V6, and at least one address for the violation emails."""

from __future__ import annotations

import pytest

from service.settings import Settings
from tests.e2e.test_admin_applications import CC


async def events(db) -> int:
    return await db.pool.fetchval("SELECT count(*) FROM events")


async def test_an_allow_list_broader_than_the_limit_is_refused_naming_it(client, company, db):
    before = await events(db)
    for entry, setting in (("0.0.0.0/0", "ALLOWLIST_MIN_PREFIX_V4"),
                           ("::/0", "ALLOWLIST_MIN_PREFIX_V6")):  # fmt: skip
        body = CC | {"ip_allowlist": ["192.0.2.10", entry]}
        response = await client.post("/admin/applications", json=body, headers=company.auth)
        assert response.status == 400
        answer = await response.json()
        assert answer["error"] == "invalid_request"
        assert answer["error_description"].startswith("ip_allowlist:")
        assert entry in answer["error_description"] and setting in answer["error_description"]
    assert await events(db) == before


async def test_a_client_credentials_application_needs_a_notification_address(client, company, db):
    before = await events(db)
    response = await client.post(
        "/admin/applications", json=CC | {"notification_emails": []}, headers=company.auth
    )
    assert response.status == 400
    assert (await response.json())["error_description"].startswith("notification_emails:")
    assert await events(db) == before


async def test_a_change_is_held_to_the_same_rules(client, company, db):
    made = await client.post("/admin/applications", json=CC, headers=company.auth)
    url = f"/admin/applications/{(await made.json())['client_id']}"
    before = await events(db)
    for patch, field in (({"ip_allowlist": ["10.0.0.0/7"]}, "ip_allowlist"),
                         ({"notification_emails": []}, "notification_emails")):  # fmt: skip
        response = await client.patch(url, json=patch, headers=company.auth)
        assert response.status == 400
        assert (await response.json())["error_description"].startswith(field)
    assert await events(db) == before
    widest = await client.patch(url, json={"ip_allowlist": ["10.0.0.0/8"]}, headers=company.auth)
    assert widest.status == 200


class TestWithANarrowerLimit:
    @pytest.fixture
    def settings(self, tmp_path):
        return Settings(data_dir=tmp_path, log_format="json", allowlist_min_prefix_v4=24)

    async def test_the_limit_is_a_setting(self, client, company):
        body = CC | {"ip_allowlist": ["10.0.0.0/16"]}
        response = await client.post("/admin/applications", json=body, headers=company.auth)
        assert response.status == 400
        assert "/24" in (await response.json())["error_description"]
