"""Snapshots of the in-memory models: a model started from a snapshot and fed the rest of
the log holds exactly what one fed the whole log holds, and decides the same."""

from __future__ import annotations

import gc
import time
import weakref
from itertools import count

import msgspec
import pytest

from projections import snapshots
from projections.directory import DirectoryModel
from projections.memory import PolicyModel
from service import events as ev
from service.eventlog import RecordedEvent
from service.eventlog.records import lean_recorded
from tests.factories import PERMISSIONS, application, digest, token

NOW = int(time.time())


def history() -> list[RecordedEvent]:
    """Every kind of event the two models act on, and token events they pass by: lone
    tokens (one expired), families refreshed and revoked, connections, codes, keys,
    rotations, permissions removed, a deleted application, users, admin keys and resource
    servers."""
    positions, versions = count(1), {}
    out: list[RecordedEvent] = []

    def add(stream: str, event: ev.Event) -> None:
        versions[stream] = versions.get(stream, 0) + 1
        tag = type(event).__name__
        out.append(lean_recorded(next(positions), versions[stream], tag, 1, event))

    for c in range(2):
        company = f"co{c}"
        add(f"company-{company}", ev.CompanyCreated(company_id=company, name=f"Co {c}"))
        add(f"company-{company}", ev.UserAdded(company_id=company, user_id=f"usr{c}",
            email=f"Pat{c}@Example.com", role="admin", password_hash=digest("pw", c)))  # fmt: skip
        add(f"company-{company}", ev.AdminKeyIssued(company_id=company, key_id=f"key{c}",
            key_hash=digest("admin", c), label="ci"))  # fmt: skip
    add("rs-1", ev.ResourceServerRegistered(resource_server_id="rs1", name="API", key_hash="k1"))
    add("rs-2", ev.ResourceServerRegistered(resource_server_id="rs2", name="B", key_hash="k2"))
    cc, code_app = application("co0", 1), application("co0", 2, "authorization_code")
    other = application("co1", 3)
    for app in (cc, code_app, other):
        add(f"application-{app.client_id}", app)
    add(f"application-{cc.client_id}", ev.ClientKeyAdded(company_id="co0", client_id=cc.client_id,
        kid="k1", thumbprint="tp", jwk={"kty": "EC", "crv": "P-256", "x": "x", "y": "y"}))  # fmt: skip
    add(f"application-{cc.client_id}", ev.ClientSecretRotated(company_id="co0",
        client_id=cc.client_id, secret_hash=digest("new"), secret_version=2))  # fmt: skip
    add("connection-co1", ev.ConnectionGranted(company_id="co1", client_id=code_app.client_id,
        user_id="usr1", permissions=PERMISSIONS[:2]))  # fmt: skip
    for n in range(40):
        lone = token(cc if n % 2 else other, n, expires_in=None if n % 5 else 3600)
        add(f"token-{lone.family_id}", msgspec.structs.replace(
            lone, family_id=f"fam_{lone.token_hash}", refresh_token_hash=None))  # fmt: skip
    add("token-gone", msgspec.structs.replace(token(cc, 99, expires_in=3600),
        family_id=f"fam_{digest('token', cc.client_id, 99)}", refresh_token_hash=None,
        expires_at=NOW - 10))  # fmt: skip
    for n in range(10):
        fam = token(code_app, 100 + n, expires_in=3600)
        add(f"token-{fam.family_id}", fam)
        add(f"token-{fam.family_id}", ev.TokenRefreshed(company_id=fam.company_id,
            client_id=fam.client_id, family_id=fam.family_id,
            spent_refresh_token_hash=fam.refresh_token_hash or "",
            token_hash=digest("t2", n), refresh_token_hash=digest("r2", n),
            permissions=PERMISSIONS[:1], issued_at=NOW, expires_at=NOW + 3600,
            refresh_expires_at=NOW + 86400))  # fmt: skip
        if n % 3 == 0:
            add(f"token-{fam.family_id}", ev.TokenRevoked(company_id=fam.company_id,
                client_id=fam.client_id, family_id=fam.family_id, reason="client_request"))  # fmt: skip
    add("code-1", ev.AuthorizationCodeIssued(company_id="co1", client_id=code_app.client_id,
        user_id="usr1", code_hash=digest("code"), redirect_uri="https://example.com/cb",
        permissions=PERMISSIONS[:1], code_challenge=None, expires_at=NOW + 600))  # fmt: skip
    add("code-1", ev.AuthorizationCodeRedeemed(company_id="co1", client_id=code_app.client_id,
        code_hash=digest("code"), family_id="fam-x"))  # fmt: skip
    return out


def later() -> list[RecordedEvent]:
    """What follows the snapshot: changes to what it holds."""
    cc, code_app = application("co0", 1), application("co0", 2, "authorization_code")
    events: list[tuple[int, ev.Event]] = [
        (4, ev.PermissionsChanged(company_id="co0", client_id=cc.client_id,
            before=PERMISSIONS, after=PERMISSIONS[1:])),
        (3, ev.PermissionsChanged(company_id="co0", client_id=code_app.client_id,
            before=PERMISSIONS, after=PERMISSIONS[:1])),
        (1, ev.ResourceServerKeyRevoked(resource_server_id="rs1")),
        (4, ev.AdminKeyRevoked(company_id="co0", key_id="key0")),
        (5, ev.UserRemoved(company_id="co1", user_id="usr1")),
        (5, ev.ApplicationDeleted(company_id="co1", client_id=application("co1", 3).client_id)),
        (1, msgspec.structs.replace(token(cc, 500), family_id=f"fam_{digest('token', cc.client_id, 500)}",
            refresh_token_hash=None)),
    ]  # fmt: skip
    return [
        lean_recorded(10_000 + n, version, type(e).__name__, 1, e)
        for n, (version, e) in enumerate(events)
    ]


def fed(events: list[RecordedEvent]) -> tuple[PolicyModel, DirectoryModel]:
    policy, directory = PolicyModel(), DirectoryModel()
    policy.apply(events)
    directory.apply(events)
    return policy, directory


def parts_of(policy: PolicyModel, directory: DirectoryModel) -> list[bytes]:
    return list(snapshots.encode(policy, directory))


def held(policy: PolicyModel, directory: DirectoryModel) -> list[object]:
    """What the parts hold, decoded: equal sets compare equal whatever order they were
    built in (their bytes need not be)."""
    head, *rest = parts_of(policy, directory)
    return [snapshots._HeadDecoder.decode(head), *map(snapshots._PartDecoder.decode, rest)]


@pytest.mark.parametrize("part_items", [snapshots.PART_ITEMS, 7])
def test_a_model_from_a_snapshot_holds_what_one_fed_the_whole_log_holds(monkeypatch, part_items):
    monkeypatch.setattr(snapshots, "PART_ITEMS", part_items)
    early, rest = history(), later()
    whole = fed(early + rest)
    policy, directory = snapshots.decode(parts_of(*fed(early)))
    assert policy.position == directory.position == early[-1].position
    policy.apply(rest)
    directory.apply(rest)
    # Everything either model holds, but what is parsed again (networks) or interned, is in
    # the parts: equal parts, equal models.
    assert held(policy, directory) == held(*whole)
    items = max(len(whole[0].tokens), len(whole[0].families))
    assert len(parts_of(policy, directory)) == 1 + -(-items // part_items)
    assert policy.apps.keys() == whole[0].apps.keys()
    for client_id, app in policy.apps.items():
        assert app.networks == whole[0].apps[client_id].networks
    assert policy.sweep(NOW) == whole[0].sweep(NOW) == 1  # the expiry heap came through


def test_a_model_from_a_snapshot_decides_as_the_other():
    early, rest = history(), later()
    whole, _ = fed(early + rest)
    policy, _ = snapshots.decode(parts_of(*fed(early)))
    policy.apply(rest)
    for key, state in list(whole.tokens.items()):
        restored = policy.token(key, NOW)
        assert restored == whole.token(key, NOW)
        assert restored is None or policy.effective_permissions(restored) == (
            whole.effective_permissions(state)
        )
    for family_id in whole.families:
        assert policy.family_version(family_id) == whole.family_version(family_id)
    for client_id in whole.apps:
        assert policy.live_grants(client_id, NOW) == whole.live_grants(client_id, NOW)
        assert policy.lone_tokens_past(client_id, 3) == whole.lone_tokens_past(client_id, 3)


def test_a_snapshot_shares_ids_and_permission_sets_as_applying_does():
    policy, _ = snapshots.decode(parts_of(*fed(history())))
    tokens = list(policy.tokens.values())
    assert len({id(t.client_id) for t in tokens}) == len({t.client_id for t in tokens})
    assert len({id(t.permissions) for t in tokens}) == len({t.permissions for t in tokens})


def test_the_directory_from_a_snapshot_keeps_one_server_under_its_id_and_its_key():
    _, directory = snapshots.decode(parts_of(*fed(history())))
    assert directory.resource_server_hashes["k1"] is directory.resource_servers["rs1"]
    assert [u.user_id for u in directory.accounts("pat0@example.com")] == ["usr0"]
    assert directory.admin_key_hashes[digest("admin", 1)] == "key1"


def test_models_at_different_positions_are_not_a_snapshot():
    policy, directory = fed(history())
    directory.position -= 1
    with pytest.raises(ValueError):
        list(snapshots.encode(policy, directory))


def test_what_is_not_a_snapshot_does_not_decode():
    for parts in ([b"\x00"], [msgspec.msgpack.encode([1, 2, 3])], []):
        with pytest.raises((msgspec.DecodeError, StopIteration)):
            snapshots.decode(parts)


def test_the_format_changes_with_the_code_that_builds_the_models(tmp_path):
    sources = snapshots._sources()
    assert {p.name for p in sources} >= {"memory.py", "directory.py", "state.py", "snapshots.py"}
    copies = []
    for n, path in enumerate(sources):
        copies.append(tmp_path / f"{n}-{path.name}")
        copies[-1].write_bytes(path.read_bytes())
    assert snapshots.format_of(copies) == snapshots.FORMAT
    memory = next(c for c in copies if c.name.endswith("-memory.py"))
    memory.write_bytes(memory.read_bytes() + b"# a change\n")
    assert snapshots.format_of(copies) != snapshots.FORMAT


def test_a_dropped_model_goes_at_once():
    """The writer builds models of its own every round: one that referred to itself (its
    handlers as bound methods) held hundreds of megabytes until a full collection."""
    policy, directory = fed(history())
    gone = [weakref.ref(policy), weakref.ref(directory)]
    gc.disable()
    try:
        del policy, directory
        assert [ref() for ref in gone] == [None, None]
    finally:
        gc.enable()
