"""Builders of the state the token and policy rules decide on, for the unit tier."""

from __future__ import annotations

import hashlib

from service.domain.state import (
    AppState,
    CodeState,
    ConnectionState,
    FamilyState,
    TokenState,
    networks_of,
)

NOW = 1_800_000_000
PERMISSIONS = frozenset({"invoices:read", "invoices:write", "debtors:read"})


def h(text: str) -> str:
    """A stand-in token hash (the rules never see a token, only its SHA-256)."""
    return hashlib.sha256(text.encode()).hexdigest()


def app(
    grant_type: str = "client_credentials",
    *,
    client_id: str = "client-1",
    company_id: str = "co_owner",
    permissions: frozenset[str] = PERMISSIONS,
    allowlist: tuple[str, ...] = ("192.0.2.0/24",),
    version: int = 3,
) -> AppState:
    return AppState(
        client_id=client_id,
        company_id=company_id,
        name="Billing sync",
        grant_type=grant_type,
        redirect_uri="https://app.example/cb" if grant_type == "authorization_code" else None,
        ip_allowlist=allowlist,
        networks=networks_of(allowlist),
        permissions=permissions,
        notification_emails=("ops@acme.example",),
        secret_hash=h("secret"),
        secret_version=1,
        previous_secret_hashes=(),
        version=version,
    )


def code(
    *,
    client_id: str = "client-1",
    company_id: str = "co_user",
    permissions: tuple[str, ...] = ("invoices:read", "invoices:write"),
    challenge: str | None = None,
    expires_at: int = NOW + 600,
    redeemed: bool = False,
) -> CodeState:
    return CodeState(
        client_id=client_id,
        company_id=company_id,
        user_id="usr_1",
        redirect_uri="https://app.example/cb",
        permissions=permissions,
        code_challenge=challenge,
        expires_at=expires_at,
        redeemed=redeemed,
    )


def connection(permissions: frozenset[str] = PERMISSIONS, version: int = 2) -> ConnectionState:
    return ConnectionState(permissions=permissions, user_id="usr_1", version=version)


def family(
    *,
    client_id: str = "client-1",
    company_id: str = "co_user",
    refresh_hash: str | None = None,
    permissions: frozenset[str] = frozenset({"invoices:read", "invoices:write"}),
    refresh_expires_at: int | None = NOW + 86400,
    version: int = 1,
) -> FamilyState:
    return FamilyState(
        client_id=client_id,
        company_id=company_id,
        refresh_token_hash=refresh_hash if refresh_hash is not None else h("refresh-1"),
        permissions=permissions,
        refresh_expires_at=refresh_expires_at,
        version=version,
    )


def token(
    *,
    family_id: str | None = "fam_x",
    client_id: str = "client-1",
    permissions: frozenset[str] = frozenset({"invoices:read"}),
    expires_at: int | None = None,
) -> TokenState:
    return TokenState(family_id, client_id, "co_user", permissions, expires_at)
