"""Plain-language "who" and "what" for the dashboard's lists of changes (the templates
escape them)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from service import events as ev
from service.context import Context


def app_namer(ctx: Context, company_id: str) -> Callable[[str], str]:
    """An application's name if it is this company's or one it connected to, else its id
    (a deleted application keeps its id)."""

    def name(client_id: str) -> str:
        app = ctx.policy.apps.get(client_id)
        if app is None:
            return client_id
        if app.company_id == company_id or (company_id, client_id) in ctx.policy.connections:
            return app.name
        return client_id

    return name


class Describer:
    """Plain-language "who" and "what" for the changes table (escaped by the caller)."""

    def __init__(self, ctx: Context, company_id: str, app_name: Callable[[str], str]) -> None:
        self._ctx = ctx
        self._company_id = company_id
        self._app = app_name

    def app(self, client_id: str) -> str:
        return self._app(client_id)

    def actor(self, actor: str | None) -> str:
        kind, _, ident = (actor or "system").partition(":")
        directory = self._ctx.directory
        # Only this company's people and keys are named; anything else stays an id.
        user = directory.users.get(ident) if kind == "user" else None
        if user is not None and user.company_id == self._company_id:
            return user.email
        key = directory.admin_keys.get(ident) if kind == "admin_key" else None
        if key is not None and key.company_id == self._company_id:
            return f"admin key “{key.label}”" if key.label else "an admin key"
        if kind == "cli":
            return f"command line ({ident})"
        return actor or "system"

    def _user(self, payload: Mapping[str, Any]) -> str:
        user_id = str(payload.get("user_id"))
        user = self._ctx.directory.users.get(user_id)
        return user.email if user and user.company_id == self._company_id else user_id

    def _key(self, key_id: str) -> str:
        key = self._ctx.directory.admin_keys.get(key_id)
        if key and key.company_id == self._company_id and key.label:
            return f"“{key.label}”"
        return key_id

    def change(self, type_: str, p: Mapping[str, Any]) -> str:
        app = f"“{self._app(str(p.get('client_id', '')))}”"
        simple: dict[str, Callable[[], str]] = {
            "ApplicationCreated": lambda: (
                f"Created application “{p.get('name')}” ({p.get('grant_type')})"
            ),
            "ApplicationRenamed": lambda: f"Renamed “{p.get('before')}” to “{p.get('after')}”",
            "ClientSecretRotated": lambda: f"Rotated the client secret of {app}",
            "ApplicationDeleted": lambda: f"Deleted application {app}",
            "UserAdded": lambda: f"Added {p.get('role')} {p.get('email')}",
            "UserPasswordChanged": lambda: f"Changed the password of {self._user(p)}",
            "UserRemoved": lambda: f"Removed user {self._user(p)}",
            "AdminKeyIssued": lambda: f"Issued admin key “{p.get('label', '')}”",
            "AdminKeyRevoked": lambda: f"Revoked admin key {self._key(str(p.get('key_id')))}",
            "ConnectionGranted": lambda: f"Connected {app}: {_list(p.get('permissions'))}",
            "ConnectionRevoked": lambda: f"Revoked the connection of {app} ({p.get('reason')})",
            "ClientKeyAdded": lambda: f"Added key “{p.get('kid')}” to {app}",
            "ClientKeyRemoved": lambda: f"Removed key “{p.get('kid')}” from {app}",
        }
        if type_ in simple:
            return simple[type_]()
        fields = {cls.__name__: label for cls, (_name, label) in ev.APPLICATION_SETTINGS.items()}
        if type_ in fields:
            before, after = _list(p.get("before")), _list(p.get("after"))
            return f"Changed the {fields[type_]} of {app}: {before} → {after}"
        if type_ == "UserRoleChanged":
            return f"Changed the role of {self._user(p)}: {p.get('before')} → {p.get('after')}"
        return type_


def _list(value: Any) -> str:
    if value is None or value == []:
        return "none"
    if isinstance(value, list):
        return ", ".join(str(v) for v in value)
    return str(value)
