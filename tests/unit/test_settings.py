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
        ("READY_MAX_LAG", "0", "READY_MAX_LAG must be from 1 to 3600"),
        ("READY_MAX_LAG", "soon", "READY_MAX_LAG must be an integer"),
        ("READY_MAX_LAG_EVENTS", "-1", "READY_MAX_LAG_EVENTS must be from 0"),
        ("MODEL_SNAPSHOT_EVERY", "-1", "MODEL_SNAPSHOT_EVERY must be from 0"),
        ("MODEL_SNAPSHOT_EVERY", "5m", "MODEL_SNAPSHOT_EVERY must be an integer"),
        ("POLICY_MAX_STALENESS", "-1", "POLICY_MAX_STALENESS must be from 0 to 3600"),
        ("ASSERTION_AUDIENCE", "endpoint", "ASSERTION_AUDIENCE must be one of issuer, issuer-or"),
        ("POLICY_MAX_STALENESS", "3601", "POLICY_MAX_STALENESS must be from 0 to 3600"),
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


def test_readiness_is_judged_by_age_unless_a_count_is_set():
    from service.web.ops import ReadinessPolicy

    default = ReadinessPolicy.of(load_settings({}, dotenv=False))
    assert (default.max_lag_seconds, default.max_lag_events) == (60.0, None)
    given = load_settings({"READY_MAX_LAG": "20", "READY_MAX_LAG_EVENTS": "50000"}, dotenv=False)
    policy = ReadinessPolicy.of(given)
    assert (policy.max_lag_seconds, policy.max_lag_events) == (20.0, 50000)


# --- a mail provider -------------------------------------------------------------------

PASSWORD = "s3cret-provider-password"


@pytest.fixture
def ca_file(tmp_path):
    import trustme

    path = tmp_path / "ca.pem"
    trustme.CA().cert_pem.write_to_path(str(path))
    return path


@pytest.mark.parametrize(
    ("env", "words"),
    [
        ({"SMTP_TLS": "ssl"}, "SMTP_TLS must be one of starttls, tls, none, got 'ssl'"),
        ({"SMTP_PASSWORD": PASSWORD}, "SMTP_PASSWORD is set but SMTP_USERNAME is not"),
        ({"SMTP_USERNAME": "alerts"}, "SMTP_USERNAME is set but SMTP_PASSWORD is not"),
        (
            {"SMTP_USERNAME": "alerts", "SMTP_PASSWORD": PASSWORD, "SMTP_TLS": "none"},
            "SMTP_TLS=none would send SMTP_PASSWORD in clear",
        ),
        ({"SMTP_TLS_VERIFY": "sometimes"}, "SMTP_TLS_VERIFY must be true or false"),
        ({"SMTP_CA_FILE": "/nonexistent/ca.pem"}, "SMTP_CA_FILE: cannot load"),
        ({"SMTP_CA_FILE": "/"}, "SMTP_CA_FILE: cannot load"),
    ],
)
def test_a_bad_mail_provider_setting_is_one_line_naming_it(env, words):
    with pytest.raises(ConfigError) as refused:
        load_settings(env, dotenv=False)
    message = str(refused.value)
    assert message.startswith(words)
    assert "\n" not in message and PASSWORD not in message


def test_a_file_that_holds_no_certificate_is_not_a_ca_file(tmp_path):
    garbage = tmp_path / "ca.pem"
    garbage.write_text("not a certificate\n")
    with pytest.raises(ConfigError) as refused:
        load_settings({"SMTP_CA_FILE": str(garbage)}, dotenv=False)
    assert str(refused.value).startswith(f"SMTP_CA_FILE: cannot load '{garbage}'")


def test_a_login_defaults_to_starttls_on_the_submission_port(ca_file):
    settings = load_settings(
        {
            "SMTP_HOST": "smtp.example.com",
            "SMTP_USERNAME": "alerts",
            "SMTP_PASSWORD": PASSWORD,
            "SMTP_CA_FILE": str(ca_file),
        },
        dotenv=False,
    )
    assert (settings.smtp_tls, settings.smtp_port, settings.smtp_tls_verify) == (
        "starttls",
        587,
        True,
    )
    assert (settings.smtp_username, settings.smtp_password) == ("alerts", PASSWORD)
    assert settings.smtp_ca_file == ca_file


@pytest.mark.parametrize(
    ("env", "tls", "port"),
    [
        ({}, "none", 25),
        ({"SMTP_TLS": "TLS"}, "tls", 465),
        ({"SMTP_TLS": "starttls"}, "starttls", 587),
        ({"SMTP_TLS": "tls", "SMTP_PORT": "2465"}, "tls", 2465),
        ({"SMTP_TLS_VERIFY": "false", "SMTP_TLS": "tls"}, "tls", 465),
    ],
)
def test_the_tls_mode_picks_the_default_port(env, tls, port):
    settings = load_settings(env, dotenv=False)
    assert (settings.smtp_tls, settings.smtp_port) == (tls, port)
    assert settings.smtp_tls_verify == (env.get("SMTP_TLS_VERIFY") != "false")


def test_the_smtp_password_is_not_in_the_settings_repr():
    settings = load_settings(
        {"SMTP_USERNAME": "alerts", "SMTP_PASSWORD": PASSWORD, "SMTP_TLS": "tls"}, dotenv=False
    )
    assert settings.smtp_password == PASSWORD
    assert "alerts" in repr(settings)
    assert PASSWORD not in repr(settings) and PASSWORD not in str(settings)


def test_model_snapshots_every_five_minutes_unless_set_and_never_at_zero():
    from projections.snapshots import writer

    assert load_settings({}, dotenv=False).model_snapshot_every == 300
    off = load_settings({"MODEL_SNAPSHOT_EVERY": "0"}, dotenv=False)
    assert writer(None, None, off.model_snapshot_every) is None  # type: ignore[arg-type]


def test_a_trusted_proxy_written_ipv4_mapped_is_the_ipv4_address_callers_come_from():
    """Callers' addresses are read IPv4-mapped as IPv4; a proxy written so must match them,
    or its X-Forwarded-For is ignored and every caller takes the proxy's address."""
    proxies = load_settings(
        {"TRUSTED_PROXIES": "::ffff:10.0.0.5 ::ffff:192.0.2.0/120, 2001:db8::/32"}, dotenv=False
    ).trusted_proxies
    assert [str(p) for p in proxies] == ["10.0.0.5/32", "192.0.2.0/24", "2001:db8::/32"]
