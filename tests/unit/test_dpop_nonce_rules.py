"""DPoP server nonces (RFC 9449 §8, §9): the pure rules, and the protocol core holding a
proof to them over an in-memory log (the store in PostgreSQL is tested end to end in
tests/e2e/test_dpop_nonce.py)."""

from __future__ import annotations

import pytest

from service import events as ev
from service.domain import dpop, dpop_nonces
from service.oauth.dpop import Presented
from service.oauth.errors import TokenIpNotAllowed
from service.oauth.policy import PolicyPoint
from tests.unit.test_dpop_endpoint import API_URL, KEY, TOKEN_URL, proof, token
from tests.unit.test_token_endpoint import ALLOWED, NOW, OUTSIDE, World

# --- the pure rules ----------------------------------------------------------------------


def test_a_new_nonce_is_random_url_safe_and_well_formed():
    made = {dpop_nonces.new_nonce() for _ in range(100)}
    assert len(made) == 100
    assert all(dpop_nonces.well_formed(n) for n in made)
    assert all(len(n) == dpop_nonces.NONCE_LENGTH for n in made)


@pytest.mark.parametrize(
    "nonce", ["", "short", "x" * 31, "x" * 33, "a" * 31 + "=", "a" * 31 + " ", "é" * 32]
)
def test_what_this_server_never_hands_out_is_not_well_formed(nonce):
    assert not dpop_nonces.well_formed(nonce)


def test_the_digest_is_sha256_and_not_the_nonce():
    nonce = dpop_nonces.new_nonce()
    digest = dpop_nonces.digest(nonce)
    assert len(digest) == 32
    assert nonce.encode() not in digest
    assert digest == dpop_nonces.digest(nonce)
    assert digest != dpop_nonces.digest(dpop_nonces.new_nonce())


def test_a_nonce_is_replaced_once_a_third_of_its_lifetime_has_passed():
    assert not dpop_nonces.rotation_due(NOW, NOW, 300)
    assert not dpop_nonces.rotation_due(NOW, NOW + 99, 300)
    assert dpop_nonces.rotation_due(NOW, NOW + 100, 300)
    assert dpop_nonces.rotation_due(NOW, NOW + 1000, 300)


def test_a_nonce_is_accepted_until_it_expires():
    nonce = dpop_nonces.new_nonce()
    assert dpop_nonces.refusal(nonce, NOW + 1, NOW) is None
    assert "expired" in (dpop_nonces.refusal(nonce, NOW, NOW) or "")
    assert "expired" in (dpop_nonces.refusal(nonce, NOW - 10, NOW) or "")


def test_a_missing_or_unknown_nonce_is_refused():
    assert "requires a nonce" in (dpop_nonces.refusal(None, None, NOW) or "")
    unknown = dpop_nonces.refusal(dpop_nonces.new_nonce(), None, NOW)
    assert "not issued" in (unknown or "")
    assert "not issued" in (dpop_nonces.refusal("made up", NOW + 60, NOW) or "")


def test_a_proof_carries_its_nonce_only_when_it_is_a_string():
    assert dpop.verify(proof("n1", nonce="abc"), "POST", TOKEN_URL, NOW).nonce == "abc"
    assert dpop.verify(proof("n2"), "POST", TOKEN_URL, NOW).nonce is None
    assert dpop.verify(proof("n3", nonce=12), "POST", TOKEN_URL, NOW).nonce is None


def test_the_resource_challenge_names_the_error_and_hands_out_the_nonce():
    refused = dpop.DpopNonceRequired("use the nonce", "N" * 32)
    assert refused.status == 401
    assert refused.headers["DPoP-Nonce"] == "N" * 32
    assert refused.headers["WWW-Authenticate"].startswith("DPoP ")
    assert 'error="use_dpop_nonce"' in refused.headers["WWW-Authenticate"]
    at_token = dpop.UseDpopNonce("use the nonce", "M" * 32)
    assert (at_token.status, at_token.error) == (400, "use_dpop_nonce")
    assert at_token.headers["DPoP-Nonce"] == "M" * 32
    assert at_token.headers["Cache-Control"] == "no-store"


# --- the protocol core, over an in-memory log --------------------------------------------


class MemoryNonces:
    """The Nonces port over a dict, with the store's rule: a nonce is known before it is
    handed out."""

    def __init__(self, now: float, lifetime: float = 300) -> None:
        self.now = now
        self.lifetime = lifetime
        self.expiry: dict[str, float] = {}
        self.handed: list[str] = []

    async def current(self) -> str:
        if not self.handed:
            self.rotate()
        return self.handed[-1]

    def rotate(self) -> None:
        nonce = dpop_nonces.new_nonce()
        self.expiry[nonce] = self.now + self.lifetime
        self.handed.append(nonce)

    async def expires_at(self, nonce: str) -> float | None:
        return self.expiry.get(nonce)


@pytest.fixture
async def world() -> World:
    w = World()
    await w.app()
    return w


async def test_a_proof_without_a_nonce_is_refused_without_spending_its_jti(world):
    nonces = MemoryNonces(NOW)
    with pytest.raises(dpop.UseDpopNonce, match="requires a nonce") as refused:
        await token(world, Presented(proof("a"), "POST", TOKEN_URL, nonces))
    assert refused.value.nonce == nonces.handed[-1]
    assert world.log.of_type(ev.DpopProofAccepted) == []
    assert world.log.of_type(ev.AccessTokenIssued) == []
    issued = await token(
        world, Presented(proof("b", nonce=refused.value.nonce), "POST", TOKEN_URL, nonces)
    )
    assert issued.token_type == "DPoP"
    assert len(world.log.of_type(ev.DpopProofAccepted)) == 1


async def test_an_expired_or_made_up_nonce_gets_a_fresh_one(world):
    nonces = MemoryNonces(NOW)
    old = await nonces.current()
    nonces.expiry[old] = NOW  # expired just now
    nonces.rotate()
    for sent in (old, dpop_nonces.new_nonce(), "not-even-well-formed"):
        with pytest.raises(dpop.UseDpopNonce) as refused:
            await token(world, Presented(proof(f"j-{sent}", nonce=sent), "POST", TOKEN_URL, nonces))
        assert refused.value.nonce == nonces.handed[-1] != old
    assert world.log.of_type(ev.DpopProofAccepted) == []


async def test_without_nonces_a_proof_needs_none(world):
    assert (await token(world, Presented(proof("c"), "POST", TOKEN_URL))).token_type == "DPoP"
    # a nonce the client had from elsewhere is not looked at
    with_one = Presented(proof("d", nonce="from elsewhere"), "POST", TOKEN_URL)
    assert (await token(world, with_one)).token_type == "DPoP"


async def test_the_policy_point_asks_for_a_nonce_after_the_allow_list(world):
    access = (await token(world, Presented(proof("e"), "POST", TOKEN_URL))).access_token
    point = PolicyPoint(world.lookups, world.ledger, lambda: NOW)
    nonces = MemoryNonces(NOW)

    async def decide(jti, nonce=None, meta=ALLOWED):
        value = proof(jti, "GET", API_URL, token=access, nonce=nonce)
        presented = Presented(value, "GET", API_URL, nonces)
        return await point.decide(access, meta.client_ip, None, "api", meta, presented)

    with pytest.raises(dpop.DpopNonceRequired) as refused:
        await decide("f")
    accepted = len(world.log.of_type(ev.DpopProofAccepted))
    assert world.log.of_type(ev.IpViolationDetected) == []  # the first round trip, no signal
    allowed = await decide("f", refused.value.nonce)  # the same jti: it was not spent
    assert allowed.token.jkt == KEY.thumbprint()
    assert len(world.log.of_type(ev.DpopProofAccepted)) == accepted + 1
    # from outside the allow list, a proof without a nonce is a violation like any other
    with pytest.raises(TokenIpNotAllowed):
        await decide("g", None, OUTSIDE)
    assert world.log.of_type(ev.IpViolationDetected)[0].token_revoked is True
