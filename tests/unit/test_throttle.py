from service.domain.throttle import Throttle


def test_a_key_is_refused_after_its_limit_until_the_window_passes():
    throttle = Throttle(limit=3, window=60)
    for t in (0, 1, 2):
        assert throttle.retry_after("k", t) == 0
        throttle.failed("k", t)
    assert throttle.retry_after("k", 3) == 57  # the first failure ages out at 60
    assert throttle.retry_after("other", 3) == 0
    assert throttle.retry_after("k", 60.5) == 0


def test_success_clears_and_memory_is_bounded():
    throttle = Throttle(limit=2, window=60, max_keys=10)
    throttle.failed("k", 0)
    throttle.failed("k", 1)
    assert throttle.retry_after("k", 2) > 0
    throttle.succeeded("k")
    assert throttle.retry_after("k", 2) == 0
    for n in range(50):
        throttle.failed(f"key{n}", 0)
    assert len(throttle._failures) == 10


def test_a_higher_limit_for_a_wider_key():
    throttle = Throttle(limit=2, window=60)
    for t in range(5):
        throttle.failed("wide", t)
    assert throttle.retry_after("wide", 5, limit=8) == 0
    assert throttle.retry_after("wide", 5, limit=5) == 55


def test_an_attempt_counted_ahead_can_be_withdrawn():
    throttle = Throttle(limit=2, window=60)
    throttle.failed("k", 0)
    throttle.failed("k", 1)  # counted before its outcome was known
    assert throttle.retry_after("k", 2) > 0
    throttle.withdraw("k", 1)  # it succeeded
    assert throttle.retry_after("k", 2) == 0
    throttle.withdraw("missing", 1)  # nothing to take back: no error
