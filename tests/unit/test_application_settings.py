"""The table of application settings (service.events.APPLICATION_SETTINGS) is what the
fold, the in-memory model, the history and the dashboard read: a setting listed there is
applied everywhere without a line of its own in any of them."""

from __future__ import annotations

from datetime import UTC, datetime

from projections.memory import PolicyModel
from service import events as ev
from service.audit.history import CHANGE_TYPES
from service.domain import applications
from service.eventlog import NO_METADATA, RecordedEvent

#: a value each setting may take, other than the one the application is created with
AFTER = {
    "name": "Renamed",
    "redirect_uri": "https://elsewhere.example/cb",
    "ip_allowlist": ["10.1.0.0/16"],
    "permissions": ["invoices:read", "invoices:write"],
    "notification_emails": ["ops@elsewhere.example"],
    "cc_token_limit": 5,
    "token_endpoint_auth_method": "private_key_jwt",
    "dpop_bound_access_tokens": True,
}

CREATED = ev.ApplicationCreated(
    company_id="co", client_id="app", name="App", grant_type="client_credentials",
    redirect_uri=None, ip_allowlist=["10.0.0.1"], permissions=["invoices:read"],
    notification_emails=["ops@acme.example"], secret_hash="h",
)  # fmt: skip


def change(cls: type[ev.Event], name: str) -> ev.Event:
    before = getattr(applications.fold([(CREATED, 1, 0.0)]), name)
    return cls(company_id="co", client_id="app", before=before, after=AFTER[name])  # type: ignore[call-arg]


def recorded(position: int, event: ev.Event) -> RecordedEvent:
    return RecordedEvent(
        position, "application-app", position, type(event).__name__, 1, "co", event,
        NO_METADATA, datetime.now(UTC), b"",
    )  # fmt: skip


def test_every_setting_has_a_sample_here():
    assert {name for name, _label in ev.APPLICATION_SETTINGS.values()} == set(AFTER)


def test_the_fold_sets_each_setting_from_its_event():
    for cls, (name, _label) in ev.APPLICATION_SETTINGS.items():
        app = applications.fold([(CREATED, 1, 0.0), (change(cls, name), 2, 1.0)])
        assert app is not None and getattr(app, name) == AFTER[name], cls.__name__
        assert app.version == 2


def test_the_in_memory_model_follows_every_setting_it_keeps():
    for cls, (name, _label) in ev.APPLICATION_SETTINGS.items():
        model = PolicyModel()
        model.apply([recorded(1, CREATED), recorded(2, change(cls, name))])
        state = model.apps["app"]
        assert state.version == 2, cls.__name__
        kept = {"token_endpoint_auth_method": "auth_method",
                "dpop_bound_access_tokens": "dpop_bound"}.get(name, name)  # fmt: skip
        value = getattr(state, kept)
        expected = AFTER[name]
        if isinstance(expected, list):
            assert sorted(value) == sorted(expected), cls.__name__
        else:
            assert value == expected, cls.__name__


def test_every_setting_change_is_in_the_history_of_changes():
    assert {cls.__name__ for cls in ev.APPLICATION_SETTINGS} <= set(CHANGE_TYPES)
