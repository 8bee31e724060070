"""The token endpoint's bounds over the in-memory wiring: a refresh repeated within the
grace (REFRESH_REUSE_GRACE), the limit of live client_credentials tokens (CC_TOKEN_LIMIT)
and the per-client rate (TOKEN_RATE_PER_CLIENT, TOKEN_RATE_BURST)."""

from __future__ import annotations

import asyncio

import pytest

from service import events as ev
from service.domain import grants, streams
from service.oauth import cc_bounds, tokens
from service.oauth.errors import InvalidGrant, InvalidScope, SlowDown
from service.oauth.revocation import revoke
from service.oauth.token_endpoint import Limits, TokenEndpoint
from tests.unit.test_token_endpoint import ALLOWED, GRACE, REDIRECT, World


@pytest.fixture
async def world() -> World:
    return World()


# --- a refresh repeated within the grace (REFRESH_REUSE_GRACE) --------------------------


async def refreshed(world: World, refresh_token: str | None):
    assert refresh_token is not None
    return await world.token({"grant_type": "refresh_token", "refresh_token": refresh_token})


async def a_grant(world: World):
    await world.app("authorization_code")
    params = {
        "grant_type": "authorization_code",
        "code": await world.code(),
        "redirect_uri": REDIRECT,
    }
    return await world.token(params)


async def live(world: World, access_token: str) -> bool:
    key = bytes.fromhex(tokens.token_hash(access_token))
    return await world.lookups.access_token(key, world.now) is not None


async def test_a_retry_of_a_spent_refresh_token_within_the_grace_gets_a_new_pair(world):
    """The client's answer was lost: its retry is recorded, not punished."""
    first = await a_grant(world)
    second = await refreshed(world, first.refresh_token)
    world.now += GRACE - 1
    retry = await refreshed(world, first.refresh_token)
    assert retry.refresh_token not in (first.refresh_token, second.refresh_token)
    assert world.log.of_type(ev.TokenRevoked) == []
    normal, repeat = world.log.of_type(ev.TokenRefreshed)
    assert not normal.grace_reuse and repeat.grace_reuse
    assert repeat.spent_refresh_token_hash == tokens.token_hash(first.refresh_token)
    # the retry rotated from the live one: the newest refresh token is the live one
    assert (await refreshed(world, retry.refresh_token)).refresh_token
    assert await live(world, second.access_token) and await live(world, retry.access_token)


async def test_two_concurrent_refreshes_with_one_refresh_token_both_succeed(world):
    """The loser of the race on the family stream decides again on what the winner
    recorded, and finds a repeat within the grace, not a theft."""
    first = await a_grant(world)
    one, two = await asyncio.gather(
        refreshed(world, first.refresh_token), refreshed(world, first.refresh_token)
    )
    assert one.refresh_token != two.refresh_token
    assert world.log.of_type(ev.TokenRevoked) == []
    assert [e.grace_reuse for e in world.log.of_type(ev.TokenRefreshed)] == [False, True]
    newest = world.log.of_type(ev.TokenRefreshed)[-1].refresh_token_hash
    [last] = [r for r in (one, two) if tokens.token_hash(r.refresh_token or "") == newest]
    assert (await refreshed(world, last.refresh_token)).access_token


async def test_a_retry_after_the_grace_revokes_the_family(world):
    first = await a_grant(world)
    second = await refreshed(world, first.refresh_token)
    world.now += GRACE
    with pytest.raises(InvalidGrant, match="already used"):
        await refreshed(world, first.refresh_token)
    assert [e.reason for e in world.log.of_type(ev.TokenRevoked)] == ["refresh_reuse"]
    assert not await live(world, second.access_token)


async def test_the_pair_a_retry_rotated_away_rotates_once_and_spends_the_retrys(world):
    """The client may hold either answer (a race, or a lost answer that arrived after
    all): the first presented rotates, after the grace too, and spends the other."""
    first = await a_grant(world)
    second = await refreshed(world, first.refresh_token)
    third = await refreshed(world, first.refresh_token)  # the retry: `second` rotated away
    world.now += GRACE
    fourth = await refreshed(world, second.refresh_token)
    assert world.log.of_type(ev.TokenRevoked) == []
    assert await live(world, fourth.access_token)
    world.now += GRACE
    with pytest.raises(InvalidGrant, match="already used"):
        await refreshed(world, third.refresh_token)
    assert [e.reason for e in world.log.of_type(ev.TokenRevoked)] == ["refresh_reuse"]
    assert not await live(world, fourth.access_token)


async def test_a_token_a_repeat_rotated_away_is_spent_once_another_is_presented(world):
    first = await a_grant(world)
    second = await refreshed(world, first.refresh_token)
    third = await refreshed(world, first.refresh_token)  # `second` rotated away, unpresented
    world.now += GRACE
    await refreshed(world, third.refresh_token)  # the live one: a rotation as usual
    with pytest.raises(InvalidGrant, match="already used"):
        await refreshed(world, second.refresh_token)
    assert [e.reason for e in world.log.of_type(ev.TokenRevoked)] == ["refresh_reuse"]


async def test_a_grace_of_zero_revokes_on_the_first_repeat():
    world = World(Limits(refresh_grace=0))
    first = await a_grant(world)
    await refreshed(world, first.refresh_token)
    with pytest.raises(InvalidGrant, match="already used"):
        await refreshed(world, first.refresh_token)
    assert [e.reason for e in world.log.of_type(ev.TokenRevoked)] == ["refresh_reuse"]


# --- client_credentials: a limit of live tokens, and a rate -----------------------------


async def cc_tokens(world: World, count: int) -> list:
    """Tokens asked for one after the other, each applied to the model before the next (as
    the process's feed does in the background: issuing does not wait for it)."""
    issued = []
    for _ in range(count):
        issued.append(await world.token({"grant_type": "client_credentials"}))
        await world.lookups.catch_up()
    return issued


async def test_past_the_limit_the_oldest_client_credentials_tokens_are_superseded():
    world = World(Limits(cc_token_limit=3))
    await world.app()
    issued = await cc_tokens(world, 5)
    alive = [await live(world, i.access_token) for i in issued]
    assert alive == [False, False, True, True, True]
    revoked = world.log.of_type(ev.TokenRevoked)
    assert [e.reason for e in revoked] == ["superseded", "superseded"]
    assert [e.family_id for e in revoked] == [
        streams.lone_family(tokens.token_hash(i.access_token)) for i in issued[:2]
    ]


async def test_a_token_revoked_by_its_client_leaves_room_under_the_limit():
    world = World(Limits(cc_token_limit=2))
    await world.app()
    one, two = await cc_tokens(world, 2)
    assert await revoke(world.lookups, world.ledger, "cid", one.access_token, ALLOWED)
    three = await world.token({"grant_type": "client_credentials"})
    assert await live(world, two.access_token) and await live(world, three.access_token)
    assert [e.reason for e in world.log.of_type(ev.TokenRevoked)] == ["client_request"]


async def test_tokens_revoked_one_by_one_leave_their_room_and_take_no_live_one_with_them():
    """The list of a client's tokens keeps revoked ones until it is next compacted; once
    compacted below the limit, nothing is over it (a negative count took the oldest live
    tokens, most of them: 5 of 7 here)."""
    world = World(Limits(cc_token_limit=10))
    await world.app()
    issued = await cc_tokens(world, 10)
    for gone in issued[:3]:
        assert await revoke(world.lookups, world.ledger, "cid", gone.access_token, ALLOWED)
    await world.lookups.catch_up()
    newest = await cc_tokens(world, 1)
    alive = [await live(world, i.access_token) for i in [*issued, *newest]]
    assert alive == [False] * 3 + [True] * 8
    assert [e.reason for e in world.log.of_type(ev.TokenRevoked)] == ["client_request"] * 3


async def counted_again(monkeypatch) -> None:
    monkeypatch.setattr(cc_bounds, "EXCESS_CHECK_DELAY", 0)


async def settle() -> None:
    """Until the counts due once tokens are applied have run (a delay of 0 here)."""
    for _ in range(5):
        await asyncio.sleep(0.01)


async def test_tokens_granted_past_the_limit_at_once_are_superseded_once_applied(monkeypatch):
    """Each token of a burst was decided on a view without the others: together they
    passed the limit, and stayed past it (they never expire) until the client asked again.
    Counted again once applied, the excess is superseded, the oldest first."""
    await counted_again(monkeypatch)
    world = World(Limits(cc_token_limit=2))
    await world.app()
    burst = [await world.token({"grant_type": "client_credentials"}) for _ in range(5)]
    await world.lookups.catch_up()
    await settle()
    await world.lookups.catch_up()
    assert [await live(world, i.access_token) for i in burst] == [False] * 3 + [True] * 2
    assert [e.reason for e in world.log.of_type(ev.TokenRevoked)] == ["superseded"] * 3


async def test_tokens_at_the_limit_one_by_one_supersede_each_one_once(monkeypatch):
    """The count again finds nothing the issuance did not supersede itself: no second
    revocation of the same token."""
    await counted_again(monkeypatch)
    world = World(Limits(cc_token_limit=3))
    await world.app()
    issued = []
    for _ in range(6):
        issued += await cc_tokens(world, 1)
        await settle()
    await world.lookups.catch_up()
    assert [await live(world, i.access_token) for i in issued] == [False] * 3 + [True] * 3
    revoked = world.log.of_type(ev.TokenRevoked)
    assert len(revoked) == len({e.family_id for e in revoked}) == 3


async def test_tokens_asked_for_at_once_at_the_limit_supersede_one_each(monkeypatch):
    """Decided at once, each on the same view, each superseded the same oldest token: under
    load at the limit, five or six revocations a token (review: 5,838 for 1,045 tokens).
    This process's tokens in flight, and those it is superseding, are now counted."""
    await counted_again(monkeypatch)
    world = World(Limits(cc_token_limit=3))
    await world.app()
    first = await cc_tokens(world, 3)
    burst = await asyncio.gather(
        *(world.token({"grant_type": "client_credentials"}) for _ in range(4))
    )
    await world.lookups.catch_up()
    await settle()
    await world.lookups.catch_up()
    alive = [await live(world, i.access_token) for i in [*first, *burst]]
    assert sum(alive) == 3 and alive[:3] == [False] * 3
    revoked = world.log.of_type(ev.TokenRevoked)
    assert len(revoked) == len({e.family_id for e in revoked}) == 4


async def test_a_client_past_its_rate_gets_slow_down_with_retry_after_and_nothing_recorded():
    world = World(Limits(rate=1, burst=2))
    await world.app()
    await world.token({"grant_type": "client_credentials"})
    await world.token({"grant_type": "client_credentials"})
    with pytest.raises(SlowDown) as refused:
        await world.token({"grant_type": "client_credentials"})
    assert refused.value.status == 429 and refused.value.error == "slow_down"
    assert refused.value.headers["Retry-After"] == "1"
    assert len(world.log.of_type(ev.AccessTokenIssued)) == 2
    world.now += 1
    assert (await world.token({"grant_type": "client_credentials"})).access_token


async def test_the_rate_holds_client_credentials_only():
    """An authorization_code application's users refresh at once; their tokens expire."""
    world = World(Limits(rate=1, burst=1))
    first = await a_grant(world)
    second = await refreshed(world, first.refresh_token)
    assert (await refreshed(world, second.refresh_token)).access_token


async def granted_elsewhere(world: World, count: int, issued_at: int) -> None:
    """Tokens another process granted, recorded in the shared log and read back here."""
    app = world.policy.apps["cid"]
    for _ in range(count):
        access_hash = tokens.token_hash(tokens.new(tokens.ACCESS))
        issue = grants.client_credentials(app, None, access_hash, issued_at)
        await world.ledger.record(issue.record, ALLOWED)
    await world.lookups.catch_up()


async def test_tokens_another_process_granted_are_taken_from_the_same_rate():
    world = World(Limits(rate=1, burst=3))
    await world.app()
    await granted_elsewhere(world, 2, int(world.now))
    await world.token({"grant_type": "client_credentials"})
    with pytest.raises(SlowDown):
        await world.token({"grant_type": "client_credentials"})
    assert len(world.log.of_type(ev.AccessTokenIssued)) == 3


async def test_tokens_granted_here_are_counted_once_when_the_model_applies_them():
    world = World(Limits(rate=1, burst=3))
    await world.app()
    assert len(await cc_tokens(world, 3)) == 3  # each applied before the next is asked for
    with pytest.raises(SlowDown):
        await world.token({"grant_type": "client_credentials"})
    assert not world.endpoint.bounds._granted  # nothing left waiting for the model


async def test_a_refused_token_leaves_nothing_waiting_for_the_model():
    world = World(Limits(rate=1, burst=3))
    await world.app()
    with pytest.raises(InvalidScope):
        await world.token({"grant_type": "client_credentials", "scope": "admin:everything"})
    assert not world.endpoint.bounds._granted


async def test_a_process_starting_up_counts_the_tokens_granted_just_before():
    """Its model caught up before its endpoint was made: before, it gave every client a
    full burst more, however many tokens it had just been granted elsewhere."""
    limits = Limits(rate=1, burst=3)
    world = World(limits)
    await world.app()
    await granted_elsewhere(world, 3, int(world.now) - 10)  # long paid back
    await granted_elsewhere(world, 2, int(world.now))
    world.endpoint = TokenEndpoint(
        world.lookups, world.ledger, lambda: world.now, limits=limits, live_tokens=world.policy
    )
    await world.token({"grant_type": "client_credentials"})
    with pytest.raises(SlowDown):
        await world.token({"grant_type": "client_credentials"})


async def test_history_older_than_a_full_refill_takes_nothing_from_the_rate():
    """A process catching up on the log: what was granted long ago (longer than a full
    refill and the clocks' leeway) is paid back."""
    world = World(Limits(rate=1, burst=3))
    await world.app()
    await granted_elsewhere(world, 5, int(world.now) - 100)
    assert len(await cc_tokens(world, 3)) == 3


async def test_a_token_granted_elsewhere_this_second_counts_whatever_the_fraction():
    """`issued_at` is whole seconds: a token granted at 1000.9 reads as 1000. With a
    refill shorter than a second, most of another process's tokens were taken for old
    ones, and not counted."""
    world = World(Limits(rate=4, burst=2))
    world.now += 0.61
    await world.app()
    await granted_elsewhere(world, 2, int(world.now))
    with pytest.raises(SlowDown):
        await world.token({"grant_type": "client_credentials"})


@pytest.mark.parametrize("apart", [-10, 10])
async def test_another_hosts_clock_neither_hides_its_tokens_nor_holds_this_one_back(apart):
    """A host 10 s behind: its tokens looked old, and were not counted. One 10 s ahead:
    the bucket took its time, and refilled nothing until this host's clock got there."""
    world = World(Limits(rate=1, burst=2))
    await world.app()
    await granted_elsewhere(world, 1, int(world.now) + apart)
    await world.token({"grant_type": "client_credentials"})
    with pytest.raises(SlowDown):
        await world.token({"grant_type": "client_credentials"})
    for _ in range(3):  # then one a second, as the rate says
        world.now += 1
        await world.token({"grant_type": "client_credentials"})


async def test_tokens_the_model_had_not_applied_yet_are_superseded_at_the_next_issuance():
    """A burst (or another process) can overshoot the limit for a moment: the next token
    the model sees the excess at supersedes all of it."""
    world = World(Limits(cc_token_limit=2))
    await world.app()
    burst = [await world.token({"grant_type": "client_credentials"}) for _ in range(4)]
    await world.lookups.catch_up()
    [latest] = await cc_tokens(world, 1)
    alive = [await live(world, i.access_token) for i in [*burst, latest]]
    assert alive == [False, False, False, True, True]
    assert [e.reason for e in world.log.of_type(ev.TokenRevoked)] == ["superseded"] * 3


def test_the_bounds_come_from_the_environment_and_a_bad_one_is_refused_by_name():
    from service.settings import ConfigError, load_settings

    env = {
        "REFRESH_REUSE_GRACE": "0",
        "CC_TOKEN_LIMIT": "50",
        "TOKEN_RATE_PER_CLIENT": "5",
        "TOKEN_RATE_BURST": "7",
    }
    assert Limits.of(load_settings(env, dotenv=False)) == Limits(0, 50, 5, 7)
    assert Limits.of(load_settings({}, dotenv=False)) == Limits()  # the documented defaults
    for name, value in [("REFRESH_REUSE_GRACE", "301"), ("TOKEN_RATE_BURST", "0")]:
        with pytest.raises(ConfigError, match=f"^{name} must be from"):
            load_settings({name: value}, dotenv=False)


async def test_a_supersession_that_cannot_be_recorded_still_answers_with_the_recorded_token():
    from structlog.testing import capture_logs

    from service.eventlog import EventLogUnavailable

    world = World(Limits(cc_token_limit=1))
    await world.app()
    [old] = await cc_tokens(world, 1)
    append = world.log.append

    async def revocations_fail(stream_id, expected_version, events, *args, **kwargs):
        if isinstance(events[0], ev.TokenRevoked):
            raise EventLogUnavailable("the database went away")
        return await append(stream_id, expected_version, events, *args, **kwargs)

    world.log.append = revocations_fail
    with capture_logs() as logs:
        new = await world.token({"grant_type": "client_credentials"})
    assert await live(world, new.access_token) and await live(world, old.access_token)
    [warning] = [e for e in logs if e["event"] == "token.supersede_failed"]
    assert warning["client_id"] == "cid" and warning["log_level"] == "warning"
    world.log.append = append  # the next issuance supersedes both
    await world.lookups.catch_up()
    [latest] = await cc_tokens(world, 1)
    assert [await live(world, t.access_token) for t in (old, new, latest)] == [False, False, True]


async def test_two_holders_cannot_take_turns_within_each_others_grace(world):
    """A sibling's rotation opens a grace for itself alone: the live one it spent, presented
    right after, is a reuse (before, each rotation re-opened the grace for the other)."""
    first = await a_grant(world)
    second = await refreshed(world, first.refresh_token)
    third = await refreshed(world, first.refresh_token)  # `second` rotated away, unpresented
    world.now += GRACE
    await refreshed(world, second.refresh_token)  # one holder
    with pytest.raises(InvalidGrant, match="already used"):
        await refreshed(world, third.refresh_token)  # the other, at once
    assert [e.reason for e in world.log.of_type(ev.TokenRevoked)] == ["refresh_reuse"]


async def test_a_siblings_rotation_may_be_retried_within_its_own_grace(world):
    first = await a_grant(world)
    second = await refreshed(world, first.refresh_token)
    await refreshed(world, first.refresh_token)
    world.now += GRACE
    await refreshed(world, second.refresh_token)
    retried = await refreshed(world, second.refresh_token)  # the answer was lost: a retry
    assert await live(world, retried.access_token)
    assert world.log.of_type(ev.TokenRevoked) == []
