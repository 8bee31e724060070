"""The per-client rate of the token endpoint: a token bucket, with the time passed in."""

from service.domain.rate import RateLimit


def test_a_burst_goes_through_then_the_rate_holds():
    rate = RateLimit(rate=2, burst=3)
    assert [rate.take("a", 100.0) for _ in range(4)] == [0, 0, 0, 1]
    assert rate.take("a", 100.5) == 0  # half a second refills one at 2 a second
    assert rate.take("a", 100.5) == 1


def test_the_wait_is_whole_seconds_and_at_least_one():
    rate = RateLimit(rate=1, burst=1)
    assert rate.take("a", 0.0) == 0
    assert rate.take("a", 0.1) == 1
    slow = RateLimit(rate=0.25, burst=1)  # one every 4 seconds
    assert slow.take("a", 0.0) == 0
    assert slow.take("a", 1.0) == 3


def test_a_refusal_takes_nothing_and_each_key_has_its_own_bucket():
    rate = RateLimit(rate=1, burst=1)
    assert rate.take("a", 0.0) == 0
    assert [rate.take("a", 0.5) for _ in range(3)] == [1, 1, 1]
    assert rate.take("a", 1.0) == 0  # the refusals did not push it further back
    assert rate.take("b", 0.5) == 0


def test_a_rate_of_zero_limits_nothing():
    rate = RateLimit(rate=0, burst=1)
    assert all(rate.take("a", 0.0) == 0 for _ in range(1000))


def test_memory_is_bounded_and_the_held_back_are_forgotten_last():
    rate = RateLimit(rate=1, burst=1, max_keys=2)
    rate.take("held", 0.0)
    rate.take("other", 0.0)
    assert rate.take("held", 0.1) == 1  # seen again, so "other" is the oldest now
    rate.take("third", 0.1)
    assert rate.take("held", 0.2) == 1
    assert rate.take("other", 0.2) == 0  # forgotten: starts full


def test_what_another_process_granted_is_taken_from_the_same_bucket():
    rate = RateLimit(rate=1, burst=3)
    rate.taken("a", 100.0)
    rate.taken("a", 100.0)
    assert [rate.take("a", 100.0) for _ in range(2)] == [0, 1]
    assert rate.take("b", 100.0) == 0  # another key's bucket is untouched


def test_grants_made_at_once_elsewhere_are_a_debt_paid_back_at_the_rate():
    rate = RateLimit(rate=1, burst=2)
    assert [rate.take("a", 100.0) for _ in range(2)] == [0, 0]
    rate.taken("a", 100.0)  # another process's burst, heard of a moment later
    rate.taken("a", 100.0)
    assert rate.take("a", 100.0) == 3  # two below empty: three seconds to one token
    assert rate.take("a", 102.5) == 1
    assert rate.take("a", 103.0) == 0


def test_the_time_heard_from_elsewhere_never_goes_back():
    late = RateLimit(rate=1, burst=1)
    assert late.take("a", 100.0) == 0
    late.taken("a", 99.0)  # heard late: counted, and nothing refilled between 99 and 100
    assert late.take("a", 101.0) == 1
    ahead = RateLimit(rate=1, burst=1)
    ahead.taken("a", 105.0)  # another host's clock, ahead of this one
    assert ahead.take("a", 104.0) == 1
    assert ahead.take("a", 105.5) == 1  # nothing refilled before 105
    assert ahead.take("a", 106.0) == 0


def test_a_rate_of_zero_counts_nothing_from_elsewhere():
    rate = RateLimit(rate=0, burst=1)
    for _ in range(10):
        rate.taken("a", 0.0)
    assert rate.take("a", 0.0) == 0


def test_what_is_heard_from_elsewhere_owes_a_burst_at_most():
    """A process that hears of minutes of grants at once (catching up) holds the client
    back for two bursts' time at most."""
    rate = RateLimit(rate=1, burst=2)
    for _ in range(100):
        rate.taken("a", 100.0)
    assert rate.take("a", 100.0) == 3
    assert rate.take("a", 103.0) == 0
