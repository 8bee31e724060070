"""What a failed sign-in waits for: one hash check's time, as this process measures it,
which a burst of sign-ins cannot inflate for long."""

from service.web.login import HashTime


def test_nothing_is_known_before_a_check_is_timed():
    assert HashTime().seconds is None


def test_the_estimate_follows_the_checks():
    timed = HashTime()
    timed.observe(0.1)
    assert timed.seconds == 0.1
    timed.observe(0.2)
    assert 0.1 < timed.seconds < 0.2


def test_a_burst_that_slows_every_check_raises_it_three_times_at_most():
    timed = HashTime()
    timed.observe(0.1)
    for _ in range(50):  # checks queued behind an attacker's burst
        timed.observe(10.0)
    assert timed.seconds == 3 * 0.1
    for _ in range(40):  # the burst over
        timed.observe(0.1)
    assert timed.seconds < 0.11
