"""The token endpoint, introspection, revocation and the policy decision point, run through
their production wiring (read models, lookups, ledger) over an in-memory event log: the
protocol's behaviour in milliseconds, without a database or a web server."""

from __future__ import annotations

import asyncio
import base64
from urllib.parse import quote_plus

import pytest

from service import events as ev
from service.domain import credentials, streams
from service.domain.grants import Record
from service.eventlog import ConcurrencyError, Metadata
from service.oauth import tokens
from service.oauth.errors import (
    InvalidClient,
    InvalidGrant,
    InvalidRequest,
    IpNotAllowed,
    TokenIpNotAllowed,
    UnauthorizedClient,
    UnsupportedGrantType,
)
from service.oauth.introspection import INACTIVE, Introspection
from service.oauth.policy import PolicyPoint
from service.oauth.revocation import revoke
from service.oauth.token_endpoint import Limits, TokenEndpoint
from tests.unit.fakes import Wiring

NOW = 1_800_000_000.0
SECRET = "s3cret-" + "x" * 36
REDIRECT = "https://app.example/cb"
ALLOWED = Metadata(actor="client:test", client_ip="192.0.2.7")
OUTSIDE = Metadata(actor="client:test", client_ip="198.51.100.1")
GRACE = Limits().refresh_grace


class World(Wiring):
    def __init__(self, limits: Limits | None = None) -> None:
        super().__init__()
        self.now = NOW
        self.endpoint = TokenEndpoint(
            self.lookups, self.ledger, lambda: self.now, limits=limits, live_tokens=self.policy
        )

    async def app(self, grant_type: str = "client_credentials", client_id: str = "cid") -> str:
        event = ev.ApplicationCreated(
            company_id="co_owner",
            client_id=client_id,
            name="Billing sync",
            grant_type=grant_type,
            redirect_uri=REDIRECT if grant_type == "authorization_code" else None,
            ip_allowlist=["192.0.2.0/24"],
            permissions=["invoices:read", "invoices:write"],
            notification_emails=["ops@acme.example"],
            secret_hash=credentials.digest(SECRET),
        )
        await self.ledger.record(
            Record(streams.application(client_id), 0, (event,)), ALLOWED, visible=True
        )
        return client_id

    async def code(self, client_id: str = "cid", permissions=("invoices:read",)) -> str:
        """A user of co_user consented; the code the browser would carry back."""
        code = tokens.new(tokens.CODE)
        ids = {"company_id": "co_user", "client_id": client_id}
        granted = ev.ConnectionGranted(**ids, user_id="usr_1", permissions=list(permissions))
        issued = ev.AuthorizationCodeIssued(
            **ids, user_id="usr_1", code_hash=tokens.token_hash(code), redirect_uri=REDIRECT,
            permissions=list(permissions), code_challenge=None, expires_at=int(self.now) + 600,
        )  # fmt: skip
        await self.ledger.record(
            Record(streams.connection("co_user", client_id), None, (granted,)), ALLOWED
        )
        await self.ledger.record(
            Record(streams.code(tokens.token_hash(code)), 0, (issued,)), ALLOWED, visible=True
        )
        return code

    async def token(self, params: dict[str, str], meta: Metadata = ALLOWED, secret: str = SECRET):
        raw = base64.b64encode(f"cid:{quote_plus(secret)}".encode()).decode()
        return await self.endpoint.token(params, f"Basic {raw}", meta)


@pytest.fixture
async def world() -> World:
    return World()


async def test_client_credentials_issues_a_token_the_model_then_knows(world):
    await world.app()
    issued = await world.token({"grant_type": "client_credentials"})
    assert issued.body()["token_type"] == "Bearer" and "expires_in" not in issued.body()
    [event] = world.log.of_type(ev.AccessTokenIssued)
    assert event.token_hash == tokens.token_hash(issued.access_token)  # only the hash is kept
    assert await world.lookups.access_token(bytes.fromhex(event.token_hash), NOW) is not None


async def test_request_errors_come_before_any_lookup(world):
    await world.app()
    with pytest.raises(InvalidRequest, match="grant_type"):
        await world.token({})
    with pytest.raises(UnsupportedGrantType):
        await world.token({"grant_type": "password"})
    with pytest.raises(InvalidClient):
        await world.endpoint.token({"grant_type": "client_credentials"}, None, ALLOWED)


async def test_a_grant_type_that_is_not_the_applications_is_unauthorized_client(world):
    await world.app()
    with pytest.raises(UnauthorizedClient):
        await world.token(
            {"grant_type": "authorization_code", "code": "x", "redirect_uri": REDIRECT}
        )


async def test_a_wrong_secret_is_invalid_client_and_records_nothing(world):
    await world.app()
    with pytest.raises(InvalidClient):
        await world.token({"grant_type": "client_credentials"}, secret="wrong")
    assert world.log.of_type(ev.AccessTokenIssued) == []


async def test_valid_credentials_from_outside_the_allow_list_are_refused_and_recorded(world):
    await world.app()
    with pytest.raises(IpNotAllowed):
        await world.token({"grant_type": "client_credentials"}, OUTSIDE)
    [violation] = world.log.of_type(ev.IpViolationDetected)
    assert violation.endpoint == "token" and violation.ip == "198.51.100.1"
    assert world.log.of_type(ev.AccessTokenIssued) == []


async def test_a_rotation_this_process_has_not_seen_still_refuses_the_old_secret(world):
    """The rotation commits (in another process, say) before this process's model hears of
    it: the token append is conditional on the application's version, so it fails, the
    client is authenticated again against the new state, and the old secret is refused."""
    await world.app()
    rotated = ev.ClientSecretRotated(
        company_id="co_owner",
        client_id="cid",
        secret_hash=credentials.digest("new"),
        secret_version=2,
    )
    hooks, world.log.appended = world.log.appended, []  # another process's append:
    await world.log.append(streams.application("cid"), 1, [rotated])  # not applied here yet
    world.log.appended = hooks
    assert world.policy.apps["cid"].secret_version == 1
    # answered like any wrong secret (nothing confirms it was once genuine), yet recorded
    with pytest.raises(InvalidClient, match=r"^client authentication failed$"):
        await world.token({"grant_type": "client_credentials"})
    assert world.log.of_type(ev.AccessTokenIssued) == []
    [used] = world.log.of_type(ev.OldClientSecretUsed)
    assert used.ip == "192.0.2.7"


async def test_a_code_redeems_once_and_its_reuse_revokes_what_it_produced(world):
    await world.app("authorization_code")
    code = await world.code()
    params = {"grant_type": "authorization_code", "code": code, "redirect_uri": REDIRECT}
    issued = await world.token(params)
    assert issued.refresh_token is not None and issued.expires_in == 7200
    with pytest.raises(InvalidGrant, match="already used"):
        await world.token(params)
    [revoked] = world.log.of_type(ev.TokenRevoked)
    assert revoked.reason == "code_reuse"
    key = bytes.fromhex(tokens.token_hash(issued.access_token))
    assert await world.lookups.access_token(key, NOW) is None


async def test_two_concurrent_redemptions_of_one_code_issue_one_family(world):
    await world.app("authorization_code")
    code = await world.code()
    params = {"grant_type": "authorization_code", "code": code, "redirect_uri": REDIRECT}
    results = await asyncio.gather(world.token(params), world.token(params), return_exceptions=True)
    assert sum(isinstance(r, InvalidGrant) for r in results) == 1
    assert len(world.log.of_type(ev.AccessTokenIssued)) == 1
    assert [e.reason for e in world.log.of_type(ev.TokenRevoked)] == ["code_reuse"]


async def test_a_missing_parameter_of_the_grant_is_invalid_request(world):
    await world.app("authorization_code")
    with pytest.raises(InvalidRequest, match="code is required"):
        await world.token(
            {"grant_type": "authorization_code", "code": "", "redirect_uri": REDIRECT}
        )
    # RFC 6749 §4.1.3: redirect_uri, because the authorization request named it
    code = await world.code()
    for missing in ({}, {"redirect_uri": ""}):
        with pytest.raises(InvalidRequest, match="redirect_uri is required"):
            await world.token({"grant_type": "authorization_code", "code": code, **missing})


async def test_refresh_rotates_and_a_spent_refresh_token_revokes_the_family(world):
    await world.app("authorization_code")
    first = await world.token(
        {"grant_type": "authorization_code", "code": await world.code(), "redirect_uri": REDIRECT}
    )
    second = await world.token(
        {"grant_type": "refresh_token", "refresh_token": first.refresh_token}
    )
    assert second.refresh_token != first.refresh_token
    world.now += GRACE  # past the grace for a retry
    with pytest.raises(InvalidGrant, match="already used"):
        await world.token({"grant_type": "refresh_token", "refresh_token": first.refresh_token})
    with pytest.raises(InvalidGrant):  # the whole family is gone, the new pair with it
        await world.token({"grant_type": "refresh_token", "refresh_token": second.refresh_token})
    assert [e.reason for e in world.log.of_type(ev.TokenRevoked)] == ["refresh_reuse"]


async def test_a_refresh_that_loses_races_to_a_winner_it_cannot_see_is_a_reuse(world):
    """Lost races are decided again on what the winner recorded; when catching up shows no
    winner (the same version lost again and again), the refresh token is taken as reused
    after the endpoint's attempts, and the grant revoked."""
    await world.app("authorization_code")
    first = await world.token(
        {"grant_type": "authorization_code", "code": await world.code(), "redirect_uri": REDIRECT}
    )
    real = world.ledger.record
    lost: list[int | None] = []

    async def hidden_winner(record, meta, *, visible=False):
        if any(isinstance(e, ev.TokenRefreshed) for e in record.events):
            lost.append(record.expected_version)
            version = record.expected_version or 0
            raise ConcurrencyError(record.stream, version, version + 1)
        return await real(record, meta, visible=visible)

    world.ledger.record = hidden_winner
    with pytest.raises(InvalidGrant):
        await world.token({"grant_type": "refresh_token", "refresh_token": first.refresh_token})
    assert len(lost) == world.endpoint.attempts and len(set(lost)) == 1
    assert [e.reason for e in world.log.of_type(ev.TokenRevoked)] == ["refresh_reuse"]


async def test_introspection_answers_for_live_tokens_and_exactly_inactive_otherwise(world):
    await world.app()
    issued = await world.token({"grant_type": "client_credentials"})
    introspection = Introspection(world.lookups, lambda: world.now)
    active = await introspection.introspect(issued.access_token, "cid")
    assert active["active"] and active["client_id"] == "cid"
    assert await introspection.introspect(issued.access_token, "another-client") == INACTIVE
    assert await introspection.introspect("tgat_garbage", None) == INACTIVE


async def test_revocation_kills_ones_own_token_and_ignores_anything_else(world):
    await world.app()
    issued = await world.token({"grant_type": "client_credentials"})
    assert not await revoke(
        world.lookups, world.ledger, "another-client", issued.access_token, ALLOWED
    )
    assert await revoke(world.lookups, world.ledger, "cid", issued.access_token, ALLOWED)
    key = bytes.fromhex(tokens.token_hash(issued.access_token))
    assert await world.lookups.access_token(key, NOW) is None


async def test_concurrent_violations_with_one_token_revoke_it_once(world):
    await world.app()
    issued = await world.token({"grant_type": "client_credentials"})
    point = PolicyPoint(world.lookups, world.ledger, lambda: world.now)
    results = await asyncio.gather(
        *(
            point.decide(issued.access_token, "198.51.100.1", None, "api", OUTSIDE)
            for _ in range(5)
        ),
        return_exceptions=True,
    )
    assert all(isinstance(r, TokenIpNotAllowed) for r in results)
    assert len(world.log.of_type(ev.TokenRevoked)) == 1
    assert len(world.log.of_type(ev.IpViolationDetected)) == 1


async def test_an_allow_list_widened_elsewhere_a_moment_before_revokes_nothing(world):
    """The change commits (in another process, say) before this process's model hears of
    it: the revocation is conditional on the application's version, so it fails, and the
    request is decided again on the widened list. Before, the token was revoked for good
    and a violation recorded, after the change that allowed the address."""
    await world.app()
    issued = await world.token({"grant_type": "client_credentials"})
    widened = ev.IpAllowlistChanged(
        company_id="co_owner", client_id="cid", before=["192.0.2.0/24"],
        after=["192.0.2.0/24", "198.51.100.0/24"],
    )  # fmt: skip
    hooks, world.log.appended = world.log.appended, []  # another process's append:
    await world.log.append(streams.application("cid"), 1, [widened])  # not applied here yet
    world.log.appended = hooks
    assert world.policy.apps["cid"].ip_allowlist == ("192.0.2.0/24",)
    point = PolicyPoint(world.lookups, world.ledger, lambda: world.now)
    allowed = await point.decide(issued.access_token, "198.51.100.1", None, "api", OUTSIDE)
    assert allowed.app.client_id == "cid"
    assert world.log.of_type(ev.TokenRevoked) == []
    assert world.log.of_type(ev.IpViolationDetected) == []
