"""Arrays sent as one text each, for the statements that take many rows at once.

asyncpg encodes an array parameter element by element, with abstract-base-class checks on
each: about half a microsecond an element here, more than the rest of a row's work. A
text array goes instead as its elements between SEPARATOR (a None as NULL), which the
statement splits back (`string_to_array($n, E'\\x1e', E'\\x1f')`); an integer array as its
literal (`$n::text::bigint[]`). JSON and hex never hold either control character raw, so
they are joined without a check; other texts are checked, and a caller sends arrays when
they would not split back.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

SEPARATOR, NULL = "\x1e", "\x1f"


def texts(items: Sequence[str | None]) -> str | None:
    """The texts as one; None when it would not split back into them: a text that holds
    SEPARATOR or NULL, or a lone empty text (an empty string splits into no element)."""
    joined = SEPARATOR.join([NULL if item is None else item for item in items])
    if items and (
        joined.count(SEPARATOR) != len(items) - 1
        or joined.count(NULL) != items.count(None)
        or joined == ""
    ):
        return None
    return joined


def clean_texts(items: Iterable[str]) -> str:
    """Texts that cannot hold either mark as one, unchecked: JSON (which escapes both
    control characters) or hex."""
    return SEPARATOR.join(items)


def numbers(items: Iterable[int | None]) -> str:
    """An integer array's literal, a None as NULL."""
    return "{" + ",".join(["NULL" if item is None else str(item) for item in items]) + "}"
