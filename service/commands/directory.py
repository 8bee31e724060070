"""Companies, users, admin keys and resource servers: command handlers."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from email_validator import EmailNotValidError, validate_email

from service import events as ev
from service.context import Context
from service.domain import credentials, passwords
from service.domain.applications import FieldError
from service.errors import Conflict, InvalidRequest, NotFound
from service.eventlog import ConcurrencyError, Metadata

ROLES = ("admin", "member")


def user_stream(email: str) -> str:
    # Keyed by the address, so two concurrent sign-ups of one address cannot both succeed.
    return "user-" + credentials.digest(email.lower())[:40]


def normalise_email(value: str, field: str = "email") -> str:
    try:
        return validate_email(value, check_deliverability=False).normalized
    except EmailNotValidError as exc:
        raise FieldError(field, f"{value!r}: {exc}") from None


@dataclass(frozen=True)
class NewCompany:
    company_id: str
    admin_user_id: str
    admin_email: str
    admin_password: str
    admin_key_id: str
    admin_key: str


async def create_company(ctx: Context, name: str, admin_email: str, meta: Metadata) -> NewCompany:
    name = name.strip()
    if not 1 <= len(name) <= 200:
        raise FieldError("name", "must be 1 to 200 characters")
    email = normalise_email(admin_email, "admin_email")
    if ctx.directory.user_by_email(email) is not None:
        raise Conflict(f"a user with email {email} already exists")
    company_id = credentials.new_id("co")
    await ctx.record(
        f"company-{company_id}", 0, [ev.CompanyCreated(company_id=company_id, name=name)], meta
    )
    password = passwords.generate_password()
    user_id = await add_user(ctx, company_id, email, "admin", password, meta)
    key_id, key = await issue_admin_key(ctx, company_id, "first admin key", meta)
    return NewCompany(company_id, user_id, email, password, key_id, key)


async def add_user(
    ctx: Context, company_id: str, email: str, role: str, password: str, meta: Metadata
) -> str:
    if role not in ROLES:
        raise FieldError("role", "must be admin or member")
    email = normalise_email(email)
    try:
        passwords.check_strength(password)
    except passwords.WeakPassword as exc:
        raise FieldError("password", str(exc)) from None
    password_hash = await asyncio.to_thread(passwords.hash_password, password)
    user_id = credentials.new_id("usr")
    event = ev.UserAdded(
        company_id=company_id, user_id=user_id, email=email, role=role, password_hash=password_hash
    )
    try:
        await ctx.record(user_stream(email), 0, [event], meta)
    except ConcurrencyError:
        raise Conflict(f"a user with email {email} already exists") from None
    return user_id


async def issue_admin_key(
    ctx: Context, company_id: str, label: str, meta: Metadata
) -> tuple[str, str]:
    if len(label) > 100:
        raise FieldError("label", "must be at most 100 characters")
    if not label.isprintable():
        raise FieldError("label", "must not contain control characters")
    key = credentials.new_admin_key()
    key_id = credentials.new_id("key")
    event = ev.AdminKeyIssued(
        company_id=company_id, key_id=key_id, key_hash=credentials.digest(key), label=label
    )
    await ctx.record(f"admin-key-{key_id}", 0, [event], meta)
    return key_id, key


async def revoke_admin_key(ctx: Context, company_id: str, key_id: str, meta: Metadata) -> None:
    key = ctx.directory.admin_keys.get(key_id)
    if key is None or key.company_id != company_id:
        raise NotFound("no such admin key")
    if key.revoked:
        return
    event = ev.AdminKeyRevoked(company_id=company_id, key_id=key_id)
    try:
        await ctx.record(f"admin-key-{key_id}", 1, [event], meta)
    except ConcurrencyError:
        return  # revoked concurrently: the outcome asked for holds


async def register_resource_server(ctx: Context, name: str, meta: Metadata) -> tuple[str, str]:
    name = name.strip()
    if not 1 <= len(name) <= 100:
        raise InvalidRequest("name must be 1 to 100 characters")
    key = credentials.new_resource_server_key()
    server_id = credentials.new_id("rs")
    event = ev.ResourceServerRegistered(
        resource_server_id=server_id, name=name, key_hash=credentials.digest(key)
    )
    await ctx.record(f"resource-server-{server_id}", 0, [event], meta)
    return server_id, key
