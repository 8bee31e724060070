"""The policy decision on its own: allow list, effective permissions, and what a violation
records (SPEC §2 "IP allow list enforcement"). No database, no clock."""

from __future__ import annotations

import pytest

from service import events as ev
from service.domain import policy, streams
from service.oauth.errors import InsufficientScope, InvalidToken
from tests.unit import rules

KEY = bytes.fromhex(rules.h("access"))


def decide(token, app, *, ip="192.0.2.7", permission=None, version=1):
    return policy.decide(KEY, token, app, lambda: version, ip, permission, "api")


def test_a_live_token_from_an_allowed_address_is_allowed():
    allowed = decide(rules.token(), rules.app())
    assert isinstance(allowed, policy.Allowed)
    assert allowed.permissions == {"invoices:read"}


@pytest.mark.parametrize(
    ("allowlist", "ip", "ok"),
    [
        ((), "203.0.113.9", True),  # optional for authorization_code: empty allows all
        (("192.0.2.0/24",), "192.0.2.200", True),
        (("192.0.2.0/24",), "192.0.3.1", False),
        (("2001:db8::/32",), "2001:db8::1", True),
        (("2001:db8::/32",), "192.0.2.1", False),
        (("192.0.2.1",), "::ffff:192.0.2.1", True),  # IPv4-mapped counts as IPv4
        (("192.0.2.1",), "not an address", False),
        (("fe80::/10",), "fe80::1%eth0", False),  # zone IDs are refused
    ],
)
def test_the_allow_list(allowlist, ip, ok):
    assert policy.ip_allowed(rules.app(allowlist=allowlist), ip) is ok


def test_unknown_or_revoked_tokens_are_invalid_token():
    with pytest.raises(InvalidToken):
        decide(None, rules.app())
    with pytest.raises(InvalidToken):
        decide(rules.token(), None)  # the application is gone


def test_a_valid_token_from_outside_the_allow_list_is_revoked_and_recorded():
    violation = decide(rules.token(family_id="fam_9"), rules.app(), ip="198.51.100.1", version=4)
    assert isinstance(violation, policy.Violation)
    assert violation.error.status == 403 and violation.error.error == "ip_not_allowed"
    assert violation.record is not None
    revoked, detected = violation.record.events
    assert isinstance(revoked, ev.TokenRevoked) and revoked.reason == "ip_violation"
    assert isinstance(detected, ev.IpViolationDetected) and detected.token_revoked
    assert detected.ip == "198.51.100.1" and detected.endpoint == "api"
    # at the family's version: concurrent requests with the token revoke it once
    assert violation.record.stream == streams.token_family("fam_9")
    assert violation.record.expected_version == 4


def test_a_lone_token_is_revoked_through_its_derived_family():
    violation = decide(rules.token(family_id=None), rules.app(), ip="198.51.100.1")
    assert isinstance(violation, policy.Violation) and violation.record is not None
    assert violation.record.stream == streams.token_family(streams.lone_family(KEY.hex()))


def test_a_violation_of_a_family_revoked_meanwhile_records_nothing_more():
    violation = decide(rules.token(), rules.app(), ip="198.51.100.1", version=None)
    assert isinstance(violation, policy.Violation) and violation.record is None


def test_a_permission_the_token_lacks_is_insufficient_scope():
    with pytest.raises(InsufficientScope):
        decide(rules.token(), rules.app(), permission="invoices:write")


def test_a_permission_removed_from_the_application_leaves_the_token_at_once():
    app = rules.app(permissions=frozenset({"debtors:read"}))
    with pytest.raises(InsufficientScope):
        decide(rules.token(), app, permission="invoices:read")


def test_a_permission_added_to_the_application_does_not_extend_the_token():
    token = rules.token(permissions=frozenset({"invoices:read"}))
    assert policy.effective_permissions(token, rules.app()) == {"invoices:read"}


def test_valid_client_credentials_from_outside_the_allow_list_are_recorded():
    record = policy.client_violation(rules.app(), "198.51.100.1", "token")
    [event] = record.events
    assert isinstance(event, ev.IpViolationDetected) and not event.token_revoked
    assert record.stream == streams.violations("client-1")


def test_an_old_secret_used_is_recorded_with_the_current_secret_version():
    record = policy.old_secret_used(rules.app(), "192.0.2.7")
    [event] = record.events
    assert isinstance(event, ev.OldClientSecretUsed) and event.secret_version == 1
    assert record.stream == streams.secret_use("client-1")
