"""Arrays packed as one text each (service/storage/packed.py)."""

from __future__ import annotations

from service.storage.packed import NULL, SEPARATOR, clean_texts, numbers, texts


def test_texts_join_with_the_separator_and_mark_none():
    assert texts(["a", None, "", "é 漢"]) == f"a{SEPARATOR}{NULL}{SEPARATOR}{SEPARATOR}é 漢"
    assert texts([]) == ""
    assert texts(["", ""]) == SEPARATOR  # two empty texts: two elements


def test_texts_that_would_not_split_back_are_refused():
    assert texts([f"a{SEPARATOR}b"]) is None
    assert texts([f"a{NULL}"]) is None
    assert texts([""]) is None  # an empty string splits into no element


def test_json_and_numbers():
    assert clean_texts(['{"a":"\\u001e"}', "[1]"]) == f'{{"a":"\\u001e"}}{SEPARATOR}[1]'
    assert numbers([1, None, -3]) == "{1,NULL,-3}"
    assert numbers([]) == "{}"
