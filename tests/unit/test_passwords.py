"""What a password must be (NIST SP 800-63B §5.1.1.2): long enough, not among what people
commonly choose, not made of the account's own words; and the same password however the
keyboard composed its accents."""

from __future__ import annotations

import unicodedata

import argon2
import pytest

from service.domain import passwords


@pytest.mark.parametrize(
    ("password", "why"),
    [
        ("password1234", "This is a very common password"),
        ("qwertyuiop12", "This is similar to a commonly used password"),
        ("aaaaaaaaaaaaaaaa", 'Repeats like "aaa" are easy to guess'),
        ("1234567890123", "too easy to guess"),
    ],
)
def test_a_commonly_chosen_password_is_refused_saying_why(password, why):
    with pytest.raises(passwords.WeakPassword) as refused:
        passwords.check_strength(password)
    said = str(refused.value)
    assert said.startswith("password is too easy to guess")
    assert why in said


def test_the_accounts_own_words_count_against_it():
    passwords.check_strength("janedoe19871987")  # nothing to do with anyone, as far as it knows
    with pytest.raises(passwords.WeakPassword):
        passwords.check_strength("janedoe19871987", ["janedoe@acme.example", "Acme"])


@pytest.mark.parametrize(
    "password",
    ["correct horse battery staple", "the new one, long enough", passwords.generate_password()],
)
def test_a_password_hard_to_guess_is_taken(password):
    passwords.check_strength(password, ["jane@acme.example", "Acme"])


def test_length_is_counted_in_characters_of_the_composed_form():
    spelled_apart = unicodedata.normalize("NFD", "éèêëéèêëéèê")  # 11 letters, 22 code points
    assert len(spelled_apart) == 22
    with pytest.raises(passwords.WeakPassword, match="at least 12 characters"):
        passwords.check_strength(spelled_apart)


def test_a_password_longer_than_what_is_scored_is_judged_by_its_start():
    passwords.check_strength("correct horse battery staple " * 8)  # 232 characters
    with pytest.raises(passwords.WeakPassword):
        passwords.check_strength("a" * 200)


def test_the_same_password_composed_or_spelled_apart_signs_in():
    composed = unicodedata.normalize("NFC", "crème brûlée à la française")
    apart = unicodedata.normalize("NFD", composed)
    assert composed != apart
    stored = passwords.hash_password(apart)
    assert passwords.verify_password(composed, stored)
    assert passwords.verify_password(apart, stored)
    assert not passwords.verify_password("creme brulee a la francaise", stored)


def test_a_hash_made_before_normalising_still_verifies_as_it_was_typed():
    apart = unicodedata.normalize("NFD", "crème brûlée à la française")
    legacy = argon2.PasswordHasher.from_parameters(passwords.PROFILE).hash(apart)
    assert passwords.verify_password(apart, legacy)
