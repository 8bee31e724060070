"""client_credentials applications: an allow list no broader than the configured limit,
and someone to alert (the seed's "to mitigate the risks of a static token")."""

from __future__ import annotations

import msgspec
import pytest

from service.domain import applications as rules
from service.domain.applications import AllowlistLimits, FieldError, NewApplication

CATALOGUE = {"invoices:read": "read invoices"}


def cc(allowlist=("192.0.2.0/24",), emails=("ops@acme.example",)) -> NewApplication:
    return NewApplication(name="Sync", grant_type="client_credentials", ip_allowlist=allowlist,
                          permissions=["invoices:read"], notification_emails=emails)  # fmt: skip


def create(command: NewApplication, limits: AllowlistLimits | None = None):
    return rules.create(command, company_id="co", client_id="c", secret_hash="x" * 64,
                        catalogue=CATALOGUE, limits=limits or AllowlistLimits())  # fmt: skip


@pytest.mark.parametrize("entry", ["0.0.0.0/0", "10.0.0.0/7", "::/0", "2001:db8::/31"])
def test_an_entry_broader_than_the_limit_is_refused_naming_the_limit_and_setting(entry):
    with pytest.raises(FieldError) as refused:
        create(cc(allowlist=("192.0.2.1", entry)))
    message = str(refused.value)
    assert message.startswith("ip_allowlist:") and entry in message
    v6 = ":" in entry
    assert ("/32" if v6 else "/8") in message
    assert ("ALLOWLIST_MIN_PREFIX_V6" if v6 else "ALLOWLIST_MIN_PREFIX_V4") in message


@pytest.mark.parametrize("entry", ["10.0.0.0/8", "2001:db8::/32", "192.0.2.7", "::1"])
def test_entries_within_the_limit_are_accepted(entry):
    assert create(cc(allowlist=(entry,))).ip_allowlist


def test_the_limit_is_a_parameter():
    with pytest.raises(FieldError):
        create(cc(allowlist=("10.0.0.0/8",)), AllowlistLimits(v4=16, v6=48))
    assert create(cc(allowlist=("0.0.0.0/0",)), AllowlistLimits(v4=0, v6=0))


def test_a_client_credentials_application_needs_a_notification_address():
    with pytest.raises(FieldError) as refused:
        create(cc(emails=()))
    assert str(refused.value).startswith("notification_emails:")


def test_authorization_code_applications_keep_their_optional_fields():
    command = NewApplication(name="Viewer", grant_type="authorization_code",
                             redirect_uri="https://app.example/cb", ip_allowlist=["0.0.0.0/0"],
                             permissions=["invoices:read"])  # fmt: skip
    assert create(command).notification_emails == []


def folded(event):
    app = rules.fold([(event, 1, 0.0)])
    assert app is not None
    return app


def test_a_patch_is_held_to_the_rules_for_the_fields_it_sets():
    app = folded(create(cc()))
    with pytest.raises(FieldError, match="ALLOWLIST_MIN_PREFIX_V4"):
        rules.change(app, rules.Patch(ip_allowlist=["0.0.0.0/1"]), CATALOGUE)
    with pytest.raises(FieldError, match="notification_emails"):
        rules.change(app, rules.Patch(notification_emails=[]), CATALOGUE)


def test_an_application_made_before_the_rules_can_still_be_renamed():
    made = create(cc(allowlist=("0.0.0.0/0",)), AllowlistLimits(0, 0))
    legacy = folded(msgspec.structs.replace(made, notification_emails=[]))
    [renamed] = rules.change(legacy, rules.Patch(name="Renamed"), CATALOGUE)
    assert renamed.after == "Renamed"


def test_the_limits_are_read_from_the_environment_and_checked():
    from service.settings import ConfigError, load_settings

    defaults = load_settings({}, dotenv=False)
    assert (defaults.allowlist_min_prefix_v4, defaults.allowlist_min_prefix_v6) == (8, 32)
    read = load_settings(
        {"ALLOWLIST_MIN_PREFIX_V4": "16", "ALLOWLIST_MIN_PREFIX_V6": "48"}, dotenv=False
    )
    assert (read.allowlist_min_prefix_v4, read.allowlist_min_prefix_v6) == (16, 48)
    for name, value in (("ALLOWLIST_MIN_PREFIX_V4", "33"), ("ALLOWLIST_MIN_PREFIX_V6", "129")):
        with pytest.raises(ConfigError, match=f"^{name} must be from 0 to"):
            load_settings({name: value}, dotenv=False)
