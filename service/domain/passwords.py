"""User passwords: argon2id (memory-hard), via argon2-cffi; checked against what is
commonly chosen, with zxcvbn's lists and patterns (NIST SP 800-63B §5.1.1.2).

A password is used in its NFKC form, so that one typed on a keyboard that composes
accents ("é") and one that sends them apart ("e" and U+0301) are the same password, and
its length is counted in characters of that form."""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence

import argon2

from service.domain.credentials import random_token

MIN_LENGTH = 12
MAX_LENGTH = 256

#: argon2id with RFC 9106's second recommended option (3 passes over 64 MiB, 4 lanes): about
#: a tenth of a second a hash on one core
PROFILE = argon2.profiles.RFC_9106_LOW_MEMORY

_hasher = argon2.PasswordHasher.from_parameters(PROFILE)


class WeakPassword(ValueError):
    pass


#: zxcvbn's score (0-4) a password needs: 3 is "safely unguessable" against an online
#: attack and a slow hash offline (about 10^8 guesses and more)
MIN_SCORE = 3
#: what zxcvbn looks at: a password whose start is hard to guess is no easier with more.
#: Its l33t matcher's time grows steeply with the substitutable characters it meets (on
#: this scale, 0.09 s for 20 of them, 0.4 s for 32, 4.5 s for 72), all of it holding the
#: interpreter, so a member changing their password could stall the service
_SCORED = 20


def normalised(password: str) -> str:
    return unicodedata.normalize("NFKC", password)


def check_strength(password: str, context: Sequence[str] = ()) -> None:
    """WeakPassword, saying why, for a password too short or too long, or one that is easy
    to guess: a common password, a keyboard walk, a repetition, a date, or words of
    `context` (the account's address, its company's name). Tens of milliseconds for a
    long password: call it off the event loop."""
    password = normalised(password)
    if len(password) < MIN_LENGTH:
        raise WeakPassword(f"password must be at least {MIN_LENGTH} characters")
    if len(password) > MAX_LENGTH:
        raise WeakPassword(f"password must be at most {MAX_LENGTH} characters")
    import zxcvbn  # its word lists take a moment to load: once, when first needed

    judged = zxcvbn.zxcvbn(password[:_SCORED], user_inputs=_words(context))
    own_words = any(m.get("dictionary_name") == "user_inputs" for m in judged["sequence"])
    if own_words and judged["score"] < 4:
        # What anyone who knows the account tries first: held to the highest score
        raise WeakPassword("password is too easy to guess: it is made of the account's own "
                           "words (its address, its company's name)")  # fmt: skip
    if judged["score"] < MIN_SCORE:
        feedback = judged["feedback"]
        why = feedback["warning"] or " ".join(feedback["suggestions"])
        said = f"password is too easy to guess{': ' + why if why else ''}"
        raise WeakPassword(said.rstrip("."))


def _words(context: Sequence[str]) -> list[str]:
    """The context as zxcvbn matches it: each item whole, and an address's parts (its local
    part, its domain's labels), lowercased."""
    words: list[str] = []
    for item in context:
        item = normalised(item).lower()
        words.append(item)
        local, _, domain = item.partition("@")
        words += [local, *domain.split(".")] if domain else item.split()
    return [w for w in dict.fromkeys(words) if len(w) >= 3]


#: before an argon2 hash made from a password's NFKC form; a hash without it (made before)
#: is of the password as it was typed
NFKC_MARK = "nfkc"


def hash_password(password: str) -> str:
    """Slow on purpose (tens of milliseconds): call it off the event loop."""
    return NFKC_MARK + _hasher.hash(normalised(password))


def verify_password(password: str, stored_hash: str) -> bool:
    """Whether `password` is the one `stored_hash` was made from: its NFKC form, or, for a
    hash made before passwords were normalised, the password as typed. One check either
    way: no input makes a sign-in cost two."""
    if stored_hash.startswith(NFKC_MARK + "$"):
        stored_hash, password = stored_hash[len(NFKC_MARK) :], normalised(password)
    try:
        return _hasher.verify(stored_hash, password)
    except (argon2.exceptions.VerificationError, argon2.exceptions.InvalidHashError):
        return False


def generate_password() -> str:
    return random_token(18)  # 24 characters, 144 bits


# A hash of nothing anyone knows: checked against when a login names an unknown user, so
# that the answer takes as long as for a known one.
DUMMY_HASH = hash_password(random_token(18))
