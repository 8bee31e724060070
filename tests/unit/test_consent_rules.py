"""What a consent records, on its own (SPEC §2 "Permissions", RFC 6749 §4.1.2)."""

from __future__ import annotations

from service import events as ev
from service.domain import consent, streams
from tests.unit import rules
from tests.unit.rules import NOW, h


def approve(connection, permissions=("invoices:read",)):
    return consent.approve(
        rules.app("authorization_code"), "co_user", "usr_1", list(permissions),
        "https://app.example/cb", None, h("code"), connection, NOW,
    )  # fmt: skip


def test_a_first_consent_records_the_grant_and_a_ten_minute_code():
    given = approve(None)
    [granted] = given.grant.events
    assert isinstance(granted, ev.ConnectionGranted) and granted.permissions == ["invoices:read"]
    assert given.grant.stream == streams.connection("co_user", "client-1")
    [issued] = given.code.events
    assert isinstance(issued, ev.AuthorizationCodeIssued)
    assert issued.expires_at == NOW + 600 and issued.code_hash == h("code")
    assert given.code.stream == streams.code(h("code")) and given.code.expected_version == 0
    assert given.code_alone is None


def test_the_same_consent_again_records_only_a_code_while_the_connection_is_unchanged():
    given = approve(rules.connection(frozenset({"invoices:read"}), version=7))
    assert given.code_alone is not None
    assert given.code_alone.events == given.code.events
    assert given.code_alone.conditions == ((streams.connection("co_user", "client-1"), 7),)


def test_a_consent_for_other_permissions_records_a_new_grant():
    given = approve(rules.connection(frozenset({"invoices:read", "invoices:write"})))
    assert given.code_alone is None
