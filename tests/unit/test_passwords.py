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


def test_a_hash_made_before_normalising_still_verifies_as_it_was_typed(monkeypatch):
    apart = unicodedata.normalize("NFD", "crème brûlée à la française")
    legacy = argon2.PasswordHasher.from_parameters(passwords.PROFILE).hash(apart)
    assert not legacy.startswith(passwords.NFKC_MARK)
    assert passwords.verify_password(apart, legacy)
    assert not passwords.verify_password(unicodedata.normalize("NFC", apart), legacy)


def test_one_check_a_sign_in_whatever_form_the_password_comes_in(monkeypatch):
    """A second check for input not in NFKC form would let anyone double a sign-in's cost."""

    class Counting:
        def __init__(self, inner):
            self.inner, self.checks = inner, []

        def verify(self, stored, password):
            self.checks.append(password)
            return self.inner.verify(stored, password)

        def hash(self, password):
            return self.inner.hash(password)

    counting = Counting(passwords._hasher)
    monkeypatch.setattr(passwords, "_hasher", counting)
    decomposed = unicodedata.normalize("NFD", "crème brûlée à la française")
    for stored in (passwords.DUMMY_HASH, passwords.hash_password("something else entirely")):
        counting.checks.clear()
        assert not passwords.verify_password(decomposed, stored)
        assert counting.checks == [unicodedata.normalize("NFKC", decomposed)]


def test_the_accounts_own_words_are_held_to_the_highest_score():
    context = ["alice.smith@globex.example", "Globex Widgets"]
    passwords.check_strength("globexwidgets2024")  # a score of 3 without the context
    with pytest.raises(passwords.WeakPassword, match="the account's own words"):
        passwords.check_strength("globexwidgets2024", context)


def test_only_the_start_of_a_password_is_scored(monkeypatch):
    """zxcvbn's l33t matcher takes seconds over 72 substitutable characters, all of it
    holding the interpreter: it is given the first 20 only, and a password whose start is
    hard to guess is taken."""
    import zxcvbn

    given = []
    real = zxcvbn.zxcvbn
    monkeypatch.setattr(zxcvbn, "zxcvbn", lambda p, **kw: given.append(p) or real(p, **kw))
    dense = "4@8({[<3=6&#!|1|70$5+%2" * 3
    passwords.check_strength(dense)
    assert given == [dense[:20]]
