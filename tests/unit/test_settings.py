"""Settings from the environment: a value out of range is one clear error, not a crash
later (a traceback from the pool, an IndexError in a rebuild)."""

import pytest

from service.settings import ConfigError, load_settings


@pytest.mark.parametrize(
    ("name", "value", "words"),
    [
        ("PORT", "99999", "PORT must be from 1 to 65535"),
        ("PORT", "-5", "PORT must be from 1 to 65535"),
        ("PORT", "eighty", "PORT must be an integer"),
        ("SMTP_PORT", "0", "SMTP_PORT must be from 1 to 65535"),
        ("DB_POOL_SIZE", "1", "DB_POOL_SIZE must be from 2"),
        ("DB_POOL_SIZE", "0", "DB_POOL_SIZE must be from 2"),
        ("PROJECTION_BATCH_SIZE", "0", "PROJECTION_BATCH_SIZE must be from 1"),
        ("PROJECTION_BATCH_SIZE", "-1", "PROJECTION_BATCH_SIZE must be from 1"),
        ("LOG_LEVEL", "bogus", "LOG_LEVEL must be one of"),
    ],
)
def test_a_value_out_of_range_is_refused_by_name(name, value, words):
    with pytest.raises(ConfigError) as refused:
        load_settings({name: value}, dotenv=False)
    assert str(refused.value).startswith(words)


def test_the_defaults_and_good_values_load():
    settings = load_settings(
        {"PORT": "9000", "DB_POOL_SIZE": "2", "LOG_LEVEL": "WARNING"}, dotenv=False
    )
    assert (settings.port, settings.pool_size, settings.log_level) == (9000, 2, "warning")
    assert load_settings({}, dotenv=False).port == 8080
