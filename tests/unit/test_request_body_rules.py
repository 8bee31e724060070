"""A JSON body's repeated keys, found at any depth, whatever the strings around them hold;
and bodies without a repeat passed without the second parse."""

from __future__ import annotations

import json

import pytest

from service.errors import InvalidRequest
from service.web import bodies


@pytest.mark.parametrize(
    ("body", "repeated"),
    [
        (b'{"a":1,"a":2}', "a"),
        (b'{"a" :1, "a"\n:2}', "a"),  # whitespace before the colon
        (b'{"a":{"b":1,"b":2}}', "b"),
        (b'{"a":[{"c":1},{"c":2,"c":3}]}', "c"),
        (b'{"a":"x\\":y","a":1}', "a"),  # an escaped quote and a colon in a value
        (b'{"a\\"":1,"a\\"":2}', 'a"'),
        (b'{"a":1,"\\u0061":2}', "a"),  # the same key, spelled otherwise
    ],
)
def test_a_repeated_key_is_refused(body, repeated):
    with pytest.raises(InvalidRequest, match=f"{repeated} is given more than once"):
        bodies.no_repeated_keys(body)


@pytest.mark.parametrize(
    "body",
    [
        b'{"a":1,"b":2}',
        b'{"a":"x\\":y","b":"\\":"}',  # escaped quotes and colons that are no keys
        b'[{"a":1},{"a":2}]',  # the same key in two objects
        b'{"a":{"a":{"a":1}}}',
        b"{}",
        b"[]",
        b'"x\\":"',  # a string holding an escaped quote and a colon
        b"42",
    ],
)
def test_no_repeat_is_passed(body):
    bodies.no_repeated_keys(body)


def test_a_body_without_a_repeat_is_not_parsed_again(monkeypatch):
    def fail(*_args, **_kwargs):
        raise AssertionError("parsed again")

    monkeypatch.setattr(json, "loads", fail)
    bodies.no_repeated_keys(b'{"token": "t", "ip": "192.0.2.9", "permission": "x:y"}')
    with pytest.raises(AssertionError, match="parsed again"):
        bodies.no_repeated_keys(b'{"ip": "192.0.2.9", "ip": "127.0.0.1"}')
