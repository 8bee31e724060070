"""The permission catalogue: the names applications may request, with what each allows."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import msgspec

NAME = re.compile(r"^[a-z][a-z0-9_]*(:[a-z][a-z0-9_]*)+\Z")

DEFAULT_CATALOGUE: Mapping[str, str] = {
    "invoices:read": "Read invoices and their status",
    "invoices:write": "Create, change and send invoices",
    "debtors:read": "Read debtors and their contact details",
    "debtors:write": "Create and change debtors",
    "payments:read": "Read payments and payment plans",
    "payments:write": "Register payments and payment plans",
    "reports:read": "Read reports and statistics",
}


class CatalogueError(ValueError):
    pass


def load_catalogue(path: Path | None) -> dict[str, str]:
    """The built-in catalogue, or a JSON object {"name": "description"} from `path`."""
    if path is None:
        return dict(DEFAULT_CATALOGUE)
    try:
        data = msgspec.json.decode(path.read_bytes(), type=dict[str, str])
    except OSError as exc:  # the reason alone: str(exc) repeats the path
        reason = exc.strerror or str(exc)
        raise CatalogueError(f"PERMISSIONS_FILE {path}: cannot read: {reason}") from exc
    except msgspec.DecodeError as exc:
        raise CatalogueError(f"PERMISSIONS_FILE {path}: {exc}") from exc
    bad = [name for name in data if not NAME.match(name)]
    if bad or not data:
        raise CatalogueError(
            f"PERMISSIONS_FILE {path}: names must look like 'invoices:read' (bad: {bad[:3]})"
        )
    return data
