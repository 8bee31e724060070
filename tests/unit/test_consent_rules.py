"""What a consent records, on its own (SPEC §2 "Permissions", RFC 6749 §4.1.2), and who may
give it: the connection only grows by consent, and only an admin adds a permission that is
not a `:read` one."""

from __future__ import annotations

import pytest

from service import events as ev
from service.domain import consent, streams
from tests.unit import rules
from tests.unit.rules import NOW, h


def approve(connection, permissions=("invoices:read",), role="admin", stream_version=None):
    return consent.approve(
        rules.app("authorization_code"), "co_user", "usr_1", list(permissions),
        "https://app.example/cb", None, h("code"), connection, NOW,
        role=role, stream_version=stream_version,
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


def test_a_narrower_consent_keeps_the_grant_and_its_code_carries_only_what_it_approved():
    held = frozenset({"invoices:read", "invoices:write"})
    given = approve(rules.connection(held, version=4), role="member")
    assert given.code_alone is not None  # the connection already holds invoices:read
    [issued] = given.code.events
    assert issued.permissions == ["invoices:read"]
    [granted] = given.grant.events
    assert set(granted.permissions) == held  # never narrowed


def test_a_wider_consent_records_the_union_at_the_version_it_was_decided_on():
    given = approve(
        rules.connection(frozenset({"debtors:read"}), version=4),
        permissions=("invoices:read",),
        stream_version=4,
    )
    assert given.code_alone is None
    [granted] = given.grant.events
    assert granted.permissions == ["debtors:read", "invoices:read"]
    assert given.grant.expected_version == 4


def test_a_member_cannot_add_a_write_permission():
    with pytest.raises(consent.AdminApprovalRequired) as refused:
        approve(None, permissions=("invoices:read", "invoices:write"), role="member")
    assert refused.value.permissions == ["invoices:write"]
    assert refused.value.status == 403


def test_a_member_may_use_a_write_permission_an_admin_already_approved():
    held = frozenset({"invoices:read", "invoices:write"})
    given = approve(rules.connection(held), permissions=("invoices:write",), role="member")
    [issued] = given.code.events
    assert issued.permissions == ["invoices:write"]


def test_an_admin_may_add_a_write_permission():
    given = approve(None, permissions=("invoices:write",), role="admin")
    [granted] = given.grant.events
    assert granted.permissions == ["invoices:write"]


def test_every_permission_but_a_read_one_needs_an_admin():
    assert consent.needs_admin(["invoices:read", "invoices:write", "x:delete"], frozenset()) == [
        "invoices:write",
        "x:delete",
    ]
    assert consent.needs_admin(["invoices:write"], frozenset({"invoices:write"})) == []
