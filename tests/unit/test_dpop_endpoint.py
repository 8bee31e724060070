"""DPoP through the production wiring over an in-memory log: the token endpoint binds, the
policy decision point holds the binding, introspection shows it."""

from __future__ import annotations

import base64
import json
from urllib.parse import quote_plus

import pytest
from joserfc import jws
from joserfc.jwk import ECKey

from service import events as ev
from service.domain import dpop, streams
from service.domain.grants import Record
from service.oauth.dpop import Presented
from service.oauth.errors import TokenIpNotAllowed
from service.oauth.introspection import Introspection
from service.oauth.policy import PolicyPoint
from tests.unit.test_token_endpoint import ALLOWED, NOW, OUTSIDE, SECRET, World

TOKEN_URL = "https://tollgate.example/oauth/token"
API_URL = "https://tollgate.example/api/v1/invoices"
KEY = ECKey.generate_key("P-256")


def proof(
    jti: str, htm: str = "POST", htu: str = TOKEN_URL, key=KEY, token=None, nonce=None
) -> str:
    claims = {"jti": jti, "htm": htm, "htu": htu, "iat": int(NOW)}
    if token is not None:
        claims["ath"] = dpop.access_token_hash(token)
    if nonce is not None:
        claims["nonce"] = nonce
    header = {"typ": "dpop+jwt", "alg": "ES256", "jwk": key.as_dict(private=False)}
    return jws.serialize_compact(header, json.dumps(claims), key, algorithms=["ES256"])


async def token(world: World, presented: Presented | None):
    raw = base64.b64encode(f"cid:{quote_plus(SECRET)}".encode()).decode()
    params = {"grant_type": "client_credentials"}
    return await world.endpoint.token(params, f"Basic {raw}", ALLOWED, presented)


@pytest.fixture
async def world() -> World:
    w = World()
    await w.app()
    return w


async def test_a_proof_binds_the_token_and_is_recorded_once(world):
    issued = await token(world, Presented(proof("a"), "POST", TOKEN_URL))
    assert issued.body()["token_type"] == "DPoP"
    [event] = world.log.of_type(ev.AccessTokenIssued)
    assert event.dpop_jkt == KEY.thumbprint()
    [use] = world.log.of_type(ev.DpopProofAccepted)
    assert (use.jkt, use.endpoint) == (KEY.thumbprint(), "token")
    with pytest.raises(dpop.InvalidDpopProof, match="used already"):
        await token(world, Presented(proof("a"), "POST", TOKEN_URL))
    assert len(world.log.of_type(ev.AccessTokenIssued)) == 1


async def test_an_application_that_requires_dpop_refuses_a_request_without_a_proof(world):
    required = ev.DpopBoundAccessTokensChanged(
        company_id="co_owner", client_id="cid", before=False, after=True
    )
    await world.ledger.record(
        Record(streams.application("cid"), None, (required,)), ALLOWED, visible=True
    )
    with pytest.raises(dpop.InvalidDpopProof, match="need a DPoP proof"):
        await token(world, None)
    with pytest.raises(dpop.InvalidDpopProof, match="one JWT"):  # an empty DPoP header
        await token(world, Presented("", "POST", TOKEN_URL))
    assert (await token(world, Presented(proof("b"), "POST", TOKEN_URL))).token_type == "DPoP"


async def test_the_policy_point_holds_a_bound_token_to_its_key(world):
    access = (await token(world, Presented(proof("c"), "POST", TOKEN_URL))).access_token
    point = PolicyPoint(world.lookups, world.ledger, lambda: NOW)

    async def decide(presented, meta=ALLOWED):
        ip = meta.client_ip
        return await point.decide(access, ip, None, "policy_check", meta, presented)

    with pytest.raises(dpop.DpopTokenRefused):
        await decide(None)  # as a Bearer token
    with pytest.raises(dpop.DpopProofRefused):
        await decide(Presented("", "GET", API_URL))
    with pytest.raises(dpop.DpopProofRefused, match="ath"):
        await decide(Presented(proof("d", "GET", API_URL), "GET", API_URL))
    good = Presented(proof("e", "GET", API_URL, token=access), "GET", API_URL)
    assert (await decide(good)).token.jkt == KEY.thumbprint()
    with pytest.raises(dpop.DpopProofRefused, match="used already"):
        await decide(good)
    # from outside the allow list, a bad proof is an IP violation: the token is revoked
    with pytest.raises(TokenIpNotAllowed):
        await decide(Presented("", "GET", API_URL), OUTSIDE)
    assert world.log.of_type(ev.IpViolationDetected)[0].token_revoked is True


async def test_introspection_names_the_key(world):
    access = (await token(world, Presented(proof("f"), "POST", TOKEN_URL))).access_token
    answer = await Introspection(world.lookups, lambda: NOW).introspect(access, None)
    assert answer["token_type"] == "DPoP"
    assert answer["cnf"] == {"jkt": KEY.thumbprint()}
