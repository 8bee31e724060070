"""The token rules on their own: what each grant records and answers, and what it refuses
(RFC 6749 §4.1, §4.4, §5.2, §6; RFC 7636; RFC 9700 §4.14). No database, no clock."""

from __future__ import annotations

import base64
import hashlib

import msgspec
import pytest

from service import events as ev
from service.domain import grants, streams
from service.oauth.errors import InvalidGrant, InvalidScope, UnauthorizedClient
from tests.unit import rules
from tests.unit.rules import NOW, h

IP = "192.0.2.7"
TOKENS = (h("access-2"), h("refresh-2"))


def challenge_of(verifier: str) -> str:
    digest = hashlib.sha256(verifier.encode()).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


# --- lifetimes ---------------------------------------------------------------------------


def test_lifetimes_follow_the_seed_table():
    assert grants.LIFETIMES["authorization_code"].access == 7200
    assert grants.LIFETIMES["authorization_code"].refresh is not None
    assert grants.LIFETIMES["client_credentials"] == grants.Lifetime(access=None, refresh=None)
    assert grants.CODE_TTL <= 600  # RFC 6749 §4.1.2: at most 10 minutes


# --- grant types ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "grant_type", "allowed"),
    [
        ("client_credentials", "client_credentials", True),
        ("client_credentials", "authorization_code", False),
        ("client_credentials", "refresh_token", False),
        ("authorization_code", "authorization_code", True),
        ("authorization_code", "refresh_token", True),
        ("authorization_code", "client_credentials", False),
    ],
)
def test_each_application_uses_only_its_own_grant_types(kind, grant_type, allowed):
    if allowed:
        grants.check_grant_type(rules.app(kind), grant_type)
    else:
        with pytest.raises(UnauthorizedClient):
            grants.check_grant_type(rules.app(kind), grant_type)


# --- scope (RFC 6749 §3.3) -------------------------------------------------------------------


def test_no_scope_asked_grants_everything_allowed():
    assert grants.scope_from(None, frozenset({"b", "a"}), frozenset({"b", "a"})) == ["a", "b"]
    assert grants.scope_from("   ", frozenset({"a"}), frozenset({"a"})) == ["a"]


def test_scope_narrows_and_drops_repeats_in_order():
    assert grants.scope_from("b a b", frozenset({"a", "b", "c"}), frozenset()) == ["b", "a"]


def test_scope_beyond_the_allowed_set_is_invalid_scope():
    with pytest.raises(InvalidScope, match="invoices:write"):
        grants.scope_from("invoices:read invoices:write", frozenset({"invoices:read"}), frozenset())


def test_an_overlong_scope_is_refused():
    with pytest.raises(InvalidScope):
        grants.scope_from("a " * 1001, frozenset({"a"}), frozenset())


# --- client_credentials (RFC 6749 §4.4) -------------------------------------------------------


def test_client_credentials_issues_a_lone_never_expiring_token():
    app = rules.app()
    issue = grants.client_credentials(app, None, h("t"), NOW)
    [event] = issue.record.events
    assert isinstance(event, ev.AccessTokenIssued)
    assert event.expires_at is None and event.refresh_token_hash is None
    assert event.family_id == streams.lone_family(h("t"))
    assert issue.record.stream == streams.token_family(event.family_id)
    assert issue.record.expected_version == 0
    assert issue.expires_in is None and not issue.refresh
    assert issue.scope == sorted(app.permissions)


def test_client_credentials_is_conditional_on_the_application_version():
    """A secret rotation that commits first must fail the issuance in any process."""
    issue = grants.client_credentials(rules.app(version=9), None, h("t"), NOW)
    assert issue.record.conditions == ((streams.application("client-1"), 9),)
    assert issue.condition_streams == {streams.application("client-1")}


def test_client_credentials_scope_is_narrowed_to_what_is_asked():
    issue = grants.client_credentials(rules.app(), "debtors:read", h("t"), NOW)
    assert issue.scope == ["debtors:read"]
    assert issue.record.events[0].permissions == ["debtors:read"]


def test_client_credentials_refuses_an_authorization_code_application():
    with pytest.raises(UnauthorizedClient):
        grants.client_credentials(rules.app("authorization_code"), None, h("t"), NOW)


# --- authorization_code (RFC 6749 §4.1.3, RFC 7636) -------------------------------------------


def redeem(
    code=None, *, app=None, connection=None, redirect="https://app.example/cb", verifier=None
):
    return grants.redeem_code(
        app or rules.app("authorization_code"),
        h("code"),
        code,
        redirect,
        verifier,
        connection if connection is not None else rules.connection(),
        TOKENS,
        NOW,
        IP,
    )


def test_a_code_redeems_into_a_family_with_a_two_hour_token_and_a_refresh_token():
    issue = redeem(rules.code())
    assert isinstance(issue, grants.Issue)
    redeemed, issued = issue.record.events
    assert isinstance(redeemed, ev.AuthorizationCodeRedeemed)
    assert isinstance(issued, ev.AccessTokenIssued)
    assert issued.token_hash == TOKENS[0] and issued.refresh_token_hash == TOKENS[1]
    assert issued.expires_at == NOW + 7200 and issue.expires_in == 7200 and issue.refresh
    assert issued.company_id == "co_user" and issued.owner_company_id == "co_owner"
    # one family per code: a second redemption finds the stream taken
    assert issue.record.stream == streams.token_family(streams.code_family(h("code")))
    assert issue.record.expected_version == 0


def test_redemption_is_conditional_on_the_application_and_the_connection():
    issue = redeem(rules.code(), connection=rules.connection(version=5))
    assert isinstance(issue, grants.Issue)
    assert dict(issue.record.conditions) == {
        streams.application("client-1"): 3,
        streams.connection("co_user", "client-1"): 5,
    }


def test_a_race_lost_on_the_family_stream_is_a_code_reuse():
    issue = redeem(rules.code())
    assert isinstance(issue, grants.Issue) and issue.conflict is not None
    assert isinstance(issue.conflict.error, InvalidGrant)
    assert [type(e) for e in issue.conflict.record.events] == [
        ev.AuthorizationCodeReused,
        ev.TokenRevoked,
    ]


def test_a_spent_code_revokes_what_it_produced():
    refusal = redeem(rules.code(redeemed=True))
    assert isinstance(refusal, grants.Refusal)
    reused, revoked = refusal.record.events
    assert isinstance(reused, ev.AuthorizationCodeReused) and reused.ip == IP
    assert isinstance(revoked, ev.TokenRevoked) and revoked.reason == "code_reuse"
    assert revoked.family_id == streams.code_family(h("code"))
    assert refusal.record.expected_version is None  # revoked even if first redeemed elsewhere


@pytest.mark.parametrize(
    "code",
    [None, rules.code(client_id="someone-else")],
    ids=["unknown", "another-clients"],
)
def test_an_unknown_or_foreign_code_is_invalid_grant(code):
    with pytest.raises(InvalidGrant, match="unknown"):
        redeem(code)


def test_an_expired_code_is_refused():
    with pytest.raises(InvalidGrant, match="expired"):
        redeem(rules.code(expires_at=NOW))


def test_the_redirect_uri_must_match_exactly():
    with pytest.raises(InvalidGrant, match="redirect_uri"):
        redeem(rules.code(), redirect="https://app.example/cb/")


def test_pkce_verifier_must_match_the_challenge():
    verifier = "v" * 50
    assert isinstance(
        redeem(rules.code(challenge=challenge_of(verifier)), verifier=verifier), grants.Issue
    )
    with pytest.raises(InvalidGrant, match="does not match"):
        redeem(rules.code(challenge=challenge_of(verifier)), verifier="w" * 50)


def test_pkce_verifier_is_required_and_well_formed():
    challenge = challenge_of("v" * 50)
    with pytest.raises(InvalidGrant, match="required"):
        redeem(rules.code(challenge=challenge))
    with pytest.raises(InvalidGrant, match="43 to 128"):
        redeem(rules.code(challenge=challenge), verifier="short")


def test_a_verifier_without_a_challenge_is_refused():
    with pytest.raises(InvalidGrant, match="no code_challenge"):
        redeem(rules.code(), verifier="v" * 50)


def test_a_code_of_a_revoked_connection_is_refused():
    with pytest.raises(InvalidGrant, match="revoked"):
        grants.redeem_code(
            rules.app("authorization_code"), h("code"), rules.code(), "https://app.example/cb",
            None, None, TOKENS, NOW, IP,
        )  # fmt: skip


def test_redemption_grants_the_consent_less_what_was_taken_away_since():
    app = rules.app("authorization_code", permissions=frozenset({"invoices:read", "debtors:read"}))
    issue = redeem(rules.code(permissions=("invoices:read", "invoices:write")), app=app)
    assert isinstance(issue, grants.Issue)
    assert issue.scope == ["invoices:read"]


def test_a_client_credentials_application_cannot_redeem_a_code():
    with pytest.raises(UnauthorizedClient):
        redeem(rules.code(), app=rules.app())


# --- refresh (RFC 6749 §6, RFC 9700 §4.14.2) ---------------------------------------------------


def do_refresh(found, *, scope=None, connection=None, app=None):
    return grants.refresh(
        app or rules.app("authorization_code"),
        h("refresh-1"),
        found,
        connection if connection is not None else rules.connection(),
        scope,
        TOKENS,
        NOW,
        IP,
    )


def test_a_refresh_rotates_the_pair_at_the_family_version():
    issue = do_refresh(("fam_1", rules.family(version=4)))
    assert isinstance(issue, grants.Issue)
    [event] = issue.record.events
    assert isinstance(event, ev.TokenRefreshed)
    assert event.spent_refresh_token_hash == h("refresh-1")
    assert (event.token_hash, event.refresh_token_hash) == TOKENS
    assert issue.record.stream == streams.token_family("fam_1")
    assert issue.record.expected_version == 4
    assert issue.refresh and issue.expires_in == 7200


def test_a_spent_refresh_token_revokes_the_whole_family():
    refusal = do_refresh(("fam_1", rules.family(refresh_hash=h("refresh-2"))))
    assert isinstance(refusal, grants.Refusal)
    reused, revoked = refusal.record.events
    assert isinstance(reused, ev.RefreshTokenReused)
    assert isinstance(revoked, ev.TokenRevoked) and revoked.reason == "refresh_reuse"


def test_a_race_lost_on_the_family_is_a_refresh_reuse():
    issue = do_refresh(("fam_1", rules.family()))
    assert isinstance(issue, grants.Issue) and issue.conflict is not None
    assert isinstance(issue.conflict.record.events[0], ev.RefreshTokenReused)


@pytest.mark.parametrize(
    "found", [None, ("fam_1", rules.family(client_id="other"))], ids=["unknown", "foreign"]
)
def test_an_unknown_or_foreign_refresh_token_is_invalid_grant(found):
    with pytest.raises(InvalidGrant, match="unknown"):
        do_refresh(found)


def test_an_expired_refresh_token_is_refused():
    with pytest.raises(InvalidGrant, match="expired"):
        do_refresh(("fam_1", rules.family(refresh_expires_at=NOW)))


def test_a_refresh_may_ask_for_part_of_the_grant_then_all_of_it_again():
    found = ("fam_1", rules.family())
    narrowed = do_refresh(found, scope="invoices:read")
    assert isinstance(narrowed, grants.Issue) and narrowed.scope == ["invoices:read"]
    whole = do_refresh(found)
    assert isinstance(whole, grants.Issue)
    assert whole.scope == ["invoices:read", "invoices:write"]


def test_a_refresh_cannot_widen_the_grant():
    with pytest.raises(InvalidScope):
        do_refresh(("fam_1", rules.family()), scope="debtors:read")


def test_a_refresh_loses_what_the_connection_lost():
    issue = do_refresh(
        ("fam_1", rules.family()), connection=rules.connection(frozenset({"invoices:read"}))
    )
    assert isinstance(issue, grants.Issue) and issue.scope == ["invoices:read"]


def test_a_refresh_through_a_revoked_connection_is_refused():
    with pytest.raises(InvalidGrant, match="revoked"):
        grants.refresh(
            rules.app("authorization_code"), h("refresh-1"), ("fam_1", rules.family()), None,
            None, TOKENS, NOW, IP,
        )  # fmt: skip


# --- revocation (RFC 7009) -----------------------------------------------------------------


def test_revoking_a_live_token_of_ones_own_revokes_its_family():
    record = grants.revoke("client-1", "fam_1", ("client-1", "co_user"), h("t"))
    assert record is not None
    [event] = record.events
    assert isinstance(event, ev.TokenRevoked) and event.reason == "client_request"
    assert record.stream == streams.token_family("fam_1")


@pytest.mark.parametrize(
    ("family_id", "owner"),
    [(None, None), ("fam_1", None), ("fam_1", ("another-client", "co_user"))],
    ids=["unknown", "dead", "another-clients"],
)
def test_revoking_anything_else_records_nothing(family_id, owner):
    assert grants.revoke("client-1", family_id, owner, h("t")) is None


# --- a refresh repeated within the grace ---------------------------------------------------


def spent_family(*recently_spent: str, spent_at: int = NOW - 3, version: int = 4):
    """A family whose live refresh token is refresh-9, rotated at `spent_at`."""
    return msgspec.structs.replace(
        rules.family(refresh_hash=h("refresh-9"), version=version),
        recently_spent=recently_spent,
        spent_at=spent_at,
    )


def repeat(family, grace=10):
    return grants.refresh(
        rules.app("authorization_code"), h("refresh-1"), ("fam_1", family),
        rules.connection(), None, TOKENS, NOW, IP, grace,
    )  # fmt: skip


def test_a_repeat_of_the_token_spent_last_within_the_grace_rotates_from_the_live_one():
    issue = repeat(spent_family(h("refresh-1")))
    assert isinstance(issue, grants.Issue) and issue.refresh
    [event] = issue.record.events
    assert isinstance(event, ev.TokenRefreshed) and event.grace_reuse
    assert event.spent_refresh_token_hash == h("refresh-1")
    assert (event.token_hash, event.refresh_token_hash) == TOKENS
    assert issue.record.expected_version == 4  # after the live one, at the family version
    assert issue.conflict is not None  # a race lost then is decided again


def test_a_repeat_of_a_token_a_repeat_rotated_away_is_allowed_within_the_same_grace():
    issue = repeat(spent_family(h("refresh-0"), h("refresh-1")))
    assert isinstance(issue, grants.Issue) and issue.record.events[0].grace_reuse


@pytest.mark.parametrize(
    "family",
    [
        spent_family(h("refresh-1"), spent_at=NOW - 10),
        spent_family(h("refresh-0")),
        spent_family(),
        spent_family(*(h(f"refresh-{n}") for n in range(1, grants.GRACE_REPEATS + 2))),
    ],
    ids=["after-the-grace", "an-older-token", "never-rotated", "too-many-repeats"],
)
def test_any_other_repeat_revokes_the_family(family):
    refusal = repeat(family)
    assert isinstance(refusal, grants.Refusal)
    assert [type(e) for e in refusal.record.events] == [ev.RefreshTokenReused, ev.TokenRevoked]
    assert refusal.record.events[1].reason == "refresh_reuse"


def test_a_grace_of_zero_allows_no_repeat():
    assert isinstance(repeat(spent_family(h("refresh-1")), grace=0), grants.Refusal)


def test_a_repeat_within_the_grace_is_held_to_the_refresh_expiry():
    expired = msgspec.structs.replace(spent_family(h("refresh-1")), refresh_expires_at=NOW)
    with pytest.raises(InvalidGrant, match="expired"):
        repeat(expired)


def test_a_normal_rotation_says_it_is_no_repeat():
    issue = do_refresh(("fam_1", rules.family()))
    assert isinstance(issue, grants.Issue) and not issue.record.events[0].grace_reuse


# --- client_credentials past the limit of live tokens ----------------------------------------


def test_client_credentials_supersedes_the_oldest_once_the_token_is_recorded():
    issue = grants.client_credentials(rules.app(), None, h("t"), NOW, (h("old-1"), h("old-2")))
    assert issue.record.events[0].token_hash == h("t")  # the new token's record is unchanged
    assert issue.record.conditions == ((streams.application("client-1"), 3),)
    streams_revoked = [then.stream for then in issue.then]
    assert streams_revoked == [
        streams.token_family(streams.lone_family(h("old-1"))),
        streams.token_family(streams.lone_family(h("old-2"))),
    ]
    for then in issue.then:
        [revoked] = then.events
        assert isinstance(revoked, ev.TokenRevoked) and revoked.reason == "superseded"
        assert revoked.client_id == "client-1" and revoked.company_id == "co_owner"
        assert then.expected_version is None  # revoked twice by two processes: still revoked


def test_client_credentials_within_the_limit_supersedes_nothing():
    assert grants.client_credentials(rules.app(), None, h("t"), NOW).then == ()


# --- DPoP and the grant (RFC 9449 §5) ------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "binds"),
    [("none", True), ("client_secret_basic", False)],
    ids=["public", "confidential"],
)
def test_a_code_redeemed_with_a_proof_binds_only_a_public_clients_grant(method, binds):
    app = msgspec.structs.replace(rules.app("authorization_code"), auth_method=method)
    issue = grants.redeem_code(
        app, h("code"), rules.code(), "https://app.example/cb", None, rules.connection(),
        TOKENS, NOW, IP, "thumbprint",
    )  # fmt: skip
    assert isinstance(issue, grants.Issue)
    issued = issue.record.events[1]
    assert isinstance(issued, ev.AccessTokenIssued)
    assert issued.dpop_jkt == "thumbprint"  # the access token is bound either way
    assert issued.binds_grant is binds
    unbound = redeem(rules.code(), app=app)
    assert isinstance(unbound, grants.Issue)
    assert unbound.record.events[1].binds_grant is False


@pytest.mark.parametrize(
    ("binds", "held_to"), [(None, "thumbprint"), (True, "thumbprint"), (False, "")],
    ids=["recorded-before-the-field", "public", "confidential"],
)  # fmt: skip
def test_the_model_holds_a_grant_to_the_key_only_where_the_event_binds_it(binds, held_to):
    from datetime import UTC, datetime

    from projections.memory import PolicyModel
    from service.eventlog import Metadata, RecordedEvent

    event = ev.AccessTokenIssued(
        company_id="co_user", client_id="app_1", family_id="fam_1", grant_type="authorization_code",
        token_hash=TOKENS[0], permissions=["invoices:read"], issued_at=NOW, expires_at=NOW + 7200,
        refresh_token_hash=TOKENS[1], dpop_jkt="thumbprint", binds_grant=binds,
    )  # fmt: skip
    model = PolicyModel()
    model.apply([
        RecordedEvent(1, streams.token_family("fam_1"), 1, "AccessTokenIssued", 1, "co_user",
                      event, Metadata(), datetime.now(UTC), b""),
    ])  # fmt: skip
    assert model.families["fam_1"].jkt == held_to
    assert model.tokens[bytes.fromhex(TOKENS[0])].jkt == "thumbprint"
