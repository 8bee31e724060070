"""Stream names and family ids are stored in the log: their formats are pinned here, so a
change to one fails loudly instead of splitting a stream's history in two."""

from __future__ import annotations

from service.domain import streams
from service.domain.credentials import digest

HASH = "ab" * 32


def test_stream_name_formats_are_stable():
    assert streams.company("co_1") == "company-co_1"
    assert streams.user("Ada@Example.com") == "user-" + digest("ada@example.com")[:40]
    assert (
        streams.account("co_1", "Ada@Example.com") == "user-" + digest("co_1\nada@example.com")[:40]
    )
    assert streams.admin_key("key_1") == "admin-key-key_1"
    assert streams.resource_server("rs_1") == "resource-server-rs_1"
    assert streams.application("cid") == "application-cid"
    assert streams.connection("co_1", "cid") == "connection-co_1-cid"
    assert streams.token_family("fam_1") == "token-fam_1"
    assert streams.code(HASH) == "code-" + HASH[:40]
    assert streams.violations("cid") == "violations-cid"
    assert streams.secret_use("cid") == "secret-use-cid"
    assert streams.notification(42) == "notification-42"
    assert (
        streams.alert_window("violations", "cid", "192.0.2.1", 1_700_000_100)
        == "violations-window-cid-1700000100-192.0.2.1"
    )
    assert (
        streams.alert_window("secret-use", "cid", "2001:db8::1", 900)
        == "secret-use-window-cid-900-2001:db8::1"
    )
    assert streams.notification_failures(42) == "notification-failures-42"


def test_family_id_formats_are_stable():
    assert streams.lone_family(HASH) == "fam_" + HASH
    assert streams.code_family(HASH) == "fam_" + HASH[:40]


def test_a_lone_family_gives_back_its_token_hash_and_nothing_else_does():
    assert streams.lone_key(streams.lone_family(HASH)) == bytes.fromhex(HASH)
    assert streams.lone_key(streams.code_family(HASH)) is None
    assert streams.lone_key("fam_" + "zz" * 32) is None


def test_the_admin_key_of_an_actor():
    assert streams.admin_key_of("admin_key:key_1") == "admin-key-key_1"
    assert streams.admin_key_of("user:usr_1") is None


def test_one_address_has_a_stream_per_company_apart_from_its_legacy_stream():
    names = {
        streams.user("ada@example.com"),
        streams.account("co_1", "ada@example.com"),
        streams.account("co_2", "ada@example.com"),
    }
    assert len(names) == 3
    assert streams.account("co_1", "ADA@example.com") == streams.account("co_1", "ada@example.com")
