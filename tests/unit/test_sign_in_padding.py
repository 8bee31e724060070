"""What a failed sign-in waits for: one hash check's time, as this process measures it,
which a burst of sign-ins cannot inflate for long, and a machine that stays slower does."""

from service.web.login import HashTime


def test_nothing_is_known_before_a_check_is_timed():
    assert HashTime().seconds is None


def test_the_estimate_follows_the_checks():
    timed = HashTime()
    timed.observe(0.1, 0.0)
    assert timed.seconds == 0.1
    timed.observe(0.2, 1.0)
    assert 0.1 < timed.seconds < 0.2


def test_a_burst_that_slows_every_check_raises_it_little_and_not_for_long():
    timed = HashTime()
    timed.observe(0.1, 0.0)
    for n in range(50):  # checks slowed by an attacker's burst, over ten seconds
        timed.observe(10.0, n / 5)
    assert timed.seconds <= 3 * 0.1 * 1.5 ** (10 / 60)
    for n in range(40):  # the burst over
        timed.observe(0.1, 10 + n)
    assert timed.seconds < 0.11


def test_a_machine_that_stays_slower_is_followed():
    """A padding held to a fast check seen once would fall short of four slower checks,
    and an address's accounts would show again."""
    timed = HashTime()
    timed.observe(0.1, 0.0)
    for n in range(1, 40):  # every check five times slower, for ten minutes
        timed.observe(0.5, n * 15.0)
    assert timed.seconds > 0.49
