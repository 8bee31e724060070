"""The admin API: applications, users and admin keys of the caller's company."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

import msgspec
from aiohttp import web

from projections.directory import AdminKey
from service.commands import applications, connections, directory, tokens
from service.context import Context
from service.domain import applications as rules
from service.domain import client_keys, passwords
from service.errors import Forbidden, InvalidRequest, NotFound
from service.eventlog import Metadata
from service.web import auth
from service.web.bodies import json_body
from service.web.keys import CONTEXT, metadata

routes = web.RouteTableDef()

Text = Annotated[str, msgspec.Meta(max_length=2000)]
ShortList = Annotated[
    list[Annotated[str, msgspec.Meta(max_length=320)]], msgspec.Meta(max_length=200)
]


AuthMethod = Literal["client_secret_basic", "client_secret_post", "private_key_jwt", "none"]
CcTokenLimit = Annotated[int, msgspec.Meta(ge=0, le=10_000_000)]


class JwksIn(msgspec.Struct):
    """A JWK Set (RFC 7517 §5) of public keys; each key is checked by the domain."""

    keys: Annotated[list[dict[str, Any]], msgspec.Meta(max_length=client_keys.MAX_KEYS)]


class ApplicationIn(msgspec.Struct, forbid_unknown_fields=True):
    name: Text
    grant_type: Literal["authorization_code", "client_credentials"]
    permissions: ShortList
    redirect_uri: Text | None = None
    ip_allowlist: ShortList = []
    notification_emails: ShortList = []
    cc_token_limit: CcTokenLimit | None = None
    token_endpoint_auth_method: AuthMethod = "client_secret_basic"  # noqa: S105 -- a name
    jwks: JwksIn | None = None
    dpop_bound_access_tokens: bool = False


class ApplicationPatchIn(msgspec.Struct, forbid_unknown_fields=True):
    name: Text | msgspec.UnsetType = msgspec.UNSET
    grant_type: str | msgspec.UnsetType = msgspec.UNSET
    redirect_uri: Text | msgspec.UnsetType | None = msgspec.UNSET
    ip_allowlist: ShortList | msgspec.UnsetType = msgspec.UNSET
    permissions: ShortList | msgspec.UnsetType = msgspec.UNSET
    notification_emails: ShortList | msgspec.UnsetType = msgspec.UNSET
    cc_token_limit: CcTokenLimit | msgspec.UnsetType | None = msgspec.UNSET
    token_endpoint_auth_method: AuthMethod | msgspec.UnsetType = msgspec.UNSET
    dpop_bound_access_tokens: bool | msgspec.UnsetType = msgspec.UNSET


class UserIn(msgspec.Struct, forbid_unknown_fields=True):
    email: Annotated[str, msgspec.Meta(max_length=320)]
    role: Literal["admin", "member"]
    password: Annotated[str, msgspec.Meta(max_length=256)] | None = None


class RoleIn(msgspec.Struct, forbid_unknown_fields=True):
    role: Literal["admin", "member"]


class ResetPasswordIn(msgspec.Struct, forbid_unknown_fields=True):
    password: Annotated[str, msgspec.Meta(max_length=256)] | None = None


class AdminKeyIn(msgspec.Struct, forbid_unknown_fields=True):
    label: Annotated[str, msgspec.Meta(max_length=100)] = ""


def _unset(value: Any) -> Any:
    return None if value is msgspec.UNSET else value


def application_json(app: rules.Application) -> dict[str, Any]:
    return {
        "client_id": app.client_id,
        "name": app.name,
        "grant_type": app.grant_type,
        "redirect_uri": app.redirect_uri,
        "ip_allowlist": app.ip_allowlist,
        "permissions": app.permissions,
        "notification_emails": app.notification_emails,
        "secret_version": app.secret_version,
        "cc_token_limit": app.cc_token_limit,
        "token_endpoint_auth_method": app.token_endpoint_auth_method,
        "jwks": {"keys": [key.jwk for key in app.keys]},  # public keys only (RFC 7591 §2)
        "dpop_bound_access_tokens": app.dpop_bound_access_tokens,
        "version": app.version,
        "created_at": _iso(app.created_at),
        "updated_at": _iso(app.updated_at),
    }


def keys_json(app: rules.Application) -> dict[str, Any]:
    return {
        "client_id": app.client_id,
        "keys": [{"kid": k.kid, "thumbprint": k.thumbprint, "jwk": k.jwk} for k in app.keys],
    }


def _iso(ts: float) -> str:
    from datetime import UTC, datetime

    return datetime.fromtimestamp(ts, UTC).isoformat()


def _etag(app: rules.Application) -> dict[str, str]:
    return {"ETag": f'"{app.version}"'}


def _if_match(request: web.Request) -> frozenset[int] | None:
    """The versions If-Match accepts (RFC 9110 §13.1.1); None: any, or no header. The
    comparison is strong: a weak tag (W/"3") matches no version, and a list of only weak
    ones fails the precondition."""
    header = request.headers.get("If-Match")
    if header is None or header.strip() == "*":
        return None
    versions = set()
    for tag in header.split(","):
        found = _VERSION_TAG.match(tag.strip())
        if found is None:  # ASCII digits only: a superscript is no version, nor 5,000 digits
            raise InvalidRequest('If-Match must name version ETags such as "3"')
        if not found["weak"]:
            versions.add(int(found["version"]))
    return frozenset(versions)


#: a version ETag, strong ("3") or weak (W/"3"): what ETag headers here carry
_VERSION_TAG = re.compile(r'(?P<weak>W/)?"(?P<version>[0-9]{1,18})"\Z')


async def _admin(request: web.Request) -> tuple[Context, auth.Principal, Metadata]:
    ctx = request.app[CONTEXT]
    who = await auth.admin(request, ctx)
    return ctx, who, metadata(request, who.actor)


# --- applications --------------------------------------------------------------------


@routes.post("/admin/applications")
async def create_application(request: web.Request) -> web.Response:
    ctx, who, meta = await _admin(request)
    body = await json_body(request, ApplicationIn)
    command = rules.NewApplication(
        name=body.name,
        grant_type=body.grant_type,
        redirect_uri=body.redirect_uri,
        ip_allowlist=body.ip_allowlist,
        permissions=body.permissions,
        notification_emails=body.notification_emails,
        cc_token_limit=body.cc_token_limit,
        token_endpoint_auth_method=body.token_endpoint_auth_method,
        jwks=None if body.jwks is None else msgspec.to_builtins(body.jwks),
        dpop_bound_access_tokens=body.dpop_bound_access_tokens,
    )
    created = await applications.create(ctx, who.company_id, command, meta)
    payload = application_json(created.app)
    if rules.has_secret(created.app.token_endpoint_auth_method):
        # An application that signs assertions, or a public client, has no use for a
        # secret: none is shown (rotate-secret makes one, should its method change).
        payload["client_secret"] = created.client_secret
    headers = _etag(created.app) | {"Cache-Control": "no-store"}
    return web.json_response(payload, status=201, headers=headers)


@routes.get("/admin/applications")
async def list_applications(request: web.Request) -> web.Response:
    ctx, who, _ = await _admin(request)
    apps = sorted(
        (a for a in ctx.policy.apps.values() if a.company_id == who.company_id),
        key=lambda a: a.name.lower(),
    )
    return web.json_response(
        {
            "applications": [
                {
                    "client_id": a.client_id,
                    "name": a.name,
                    "grant_type": a.grant_type,
                    "redirect_uri": a.redirect_uri,
                    "ip_allowlist": list(a.ip_allowlist),
                    "permissions": sorted(a.permissions),
                    "notification_emails": list(a.notification_emails),
                    "secret_version": a.secret_version,
                    "cc_token_limit": a.cc_token_limit,
                    "token_endpoint_auth_method": a.auth_method,
                    "dpop_bound_access_tokens": a.dpop_bound,
                    "version": a.version,
                }
                for a in apps
            ]
        }
    )


@routes.get("/admin/applications/{client_id}")
async def get_application(request: web.Request) -> web.Response:
    ctx, who, _ = await _admin(request)
    app = await applications.load(ctx, who.company_id, request.match_info["client_id"])
    return web.json_response(application_json(app), headers=_etag(app))


@routes.patch("/admin/applications/{client_id}")
async def patch_application(request: web.Request) -> web.Response:
    ctx, who, meta = await _admin(request)
    if_match = _if_match(request)
    body = await json_body(request, ApplicationPatchIn)
    patch = rules.Patch(
        name=_unset(body.name),
        grant_type=_unset(body.grant_type),
        redirect_uri=_unset(body.redirect_uri),
        clear_redirect_uri=body.redirect_uri is None,
        ip_allowlist=_unset(body.ip_allowlist),
        permissions=_unset(body.permissions),
        notification_emails=_unset(body.notification_emails),
        cc_token_limit=_unset(body.cc_token_limit),
        clear_cc_token_limit=body.cc_token_limit is None,
        token_endpoint_auth_method=_unset(body.token_endpoint_auth_method),
        dpop_bound_access_tokens=_unset(body.dpop_bound_access_tokens),
    )
    client_id = request.match_info["client_id"]
    app = await applications.update(ctx, who.company_id, client_id, patch, meta, if_match=if_match)
    return web.json_response(application_json(app), headers=_etag(app))


@routes.delete("/admin/applications/{client_id}")
async def delete_application(request: web.Request) -> web.Response:
    ctx, who, meta = await _admin(request)
    client_id = request.match_info["client_id"]
    await applications.delete(ctx, who.company_id, client_id, meta, if_match=_if_match(request))
    return web.Response(status=204)


@routes.post("/admin/applications/{client_id}/rotate-secret")
async def rotate_secret(request: web.Request) -> web.Response:
    ctx, who, meta = await _admin(request)
    client_id = request.match_info["client_id"]
    app, secret = await applications.rotate_secret(
        ctx, who.company_id, client_id, meta, if_match=_if_match(request)
    )
    return web.json_response(
        {"client_id": app.client_id, "client_secret": secret, "secret_version": app.secret_version},
        headers={"Cache-Control": "no-store"},
    )


@routes.get("/admin/applications/{client_id}/keys")
async def list_client_keys(request: web.Request) -> web.Response:
    """The public keys the application signs its client assertions with."""
    ctx, who, _ = await _admin(request)
    app = await applications.load(ctx, who.company_id, request.match_info["client_id"])
    return web.json_response(keys_json(app), headers=_etag(app))


@routes.post("/admin/applications/{client_id}/keys")
async def add_client_keys(request: web.Request) -> web.Response:
    """Register public keys (a JWK Set) beside the ones there: rotation adds the new key,
    moves the client to it, then removes the old one."""
    ctx, who, meta = await _admin(request)
    body = await json_body(request, JwksIn)
    client_id = request.match_info["client_id"]
    jwks = msgspec.to_builtins(body)
    app = await applications.add_keys(ctx, who.company_id, client_id, jwks, meta)
    return web.json_response(keys_json(app), status=201, headers=_etag(app))


# `{kid:.+}`: a kid is any printable text, "/" included, which `{kid}` would stop at; the
# router matches the still-encoded path, so "team%2Fec-1" and "team/ec-1" name one key.
@routes.delete("/admin/applications/{client_id}/keys/{kid:.+}")
async def remove_client_key(request: web.Request) -> web.Response:
    """Assertions signed with the key are refused from now on, in every process."""
    ctx, who, meta = await _admin(request)
    client_id, kid = request.match_info["client_id"], request.match_info["kid"]
    await applications.remove_key(ctx, who.company_id, client_id, kid, meta)
    return web.Response(status=204)


@routes.post("/admin/applications/{client_id}/revoke-tokens")
async def revoke_tokens(request: web.Request) -> web.Response:
    """The kill switch: every live token of the application revoked; client_id, secret
    and connections kept."""
    ctx, who, meta = await _admin(request)
    client_id = request.match_info["client_id"]
    revoked = await tokens.revoke_tokens(
        ctx, who.company_id, client_id, meta, if_match=_if_match(request)
    )
    return web.json_response({"client_id": client_id, "revoked": revoked})


# --- users and keys ------------------------------------------------------------------


@routes.post("/admin/users")
async def create_user(request: web.Request) -> web.Response:
    ctx, who, meta = await _admin(request)
    body = await json_body(request, UserIn)
    generated = body.password is None
    password = passwords.generate_password() if body.password is None else body.password
    user_id = await directory.add_user(ctx, who.company_id, body.email, body.role, password, meta)
    user = ctx.directory.users[user_id]
    payload: dict[str, Any] = {"user_id": user_id, "email": user.email, "role": user.role}
    if generated:
        payload["password"] = password  # shown this once
    return web.json_response(payload, status=201, headers={"Cache-Control": "no-store"})


@routes.get("/admin/users")
async def list_users(request: web.Request) -> web.Response:
    ctx, who, _ = await _admin(request)
    users = sorted(ctx.directory.company_users(who.company_id), key=lambda u: u.email)
    return web.json_response(
        {"users": [{"user_id": u.user_id, "email": u.email, "role": u.role} for u in users]}
    )


def _user_json(ctx: Context, user_id: str) -> dict[str, Any]:
    user = ctx.directory.users[user_id]
    return {"user_id": user.user_id, "email": user.email, "role": user.role}


@routes.patch("/admin/users/{user_id}")
async def patch_user(request: web.Request) -> web.Response:
    """A role change; the company's last admin stays one (409 last_admin)."""
    ctx, who, meta = await _admin(request)
    body = await json_body(request, RoleIn)
    user_id = request.match_info["user_id"]
    await directory.change_role(ctx, who.company_id, user_id, body.role, meta)
    return web.json_response(_user_json(ctx, user_id))


@routes.delete("/admin/users/{user_id}")
async def delete_user(request: web.Request) -> web.Response:
    """The user can no longer sign in; their sessions end at once, in every process."""
    ctx, who, meta = await _admin(request)
    await directory.remove_user(ctx, who.company_id, request.match_info["user_id"], meta)
    return web.Response(status=204)


@routes.post("/admin/users/{user_id}/reset-password")
async def reset_password(request: web.Request) -> web.Response:
    """A new password for a user of the company: the one given, or a generated one shown
    in this answer only. The user's sessions end."""
    ctx, who, meta = await _admin(request)
    # No body (or an empty one) asks for a generated password.
    given = (await json_body(request, ResetPasswordIn)).password if request.body_exists else None
    user_id = request.match_info["user_id"]
    if who.actor == f"user:{user_id}":
        # One's own password is changed with the current one (POST /session/password), as
        # the dashboard has it: a stolen session must not be enough to take the account.
        raise Forbidden("change your own password with POST /session/password")
    password = await directory.reset_password(ctx, who.company_id, user_id, meta, password=given)
    payload: dict[str, Any] = {"user_id": user_id}
    if given is None:
        payload["password"] = password  # shown this once
    return web.json_response(payload, headers={"Cache-Control": "no-store"})


@routes.post("/admin/keys")
async def create_key(request: web.Request) -> web.Response:
    ctx, who, meta = await _admin(request)
    body = await json_body(request, AdminKeyIn)
    key_id, key = await directory.issue_admin_key(ctx, who.company_id, body.label, meta)
    return web.json_response(
        {"key_id": key_id, "admin_key": key, "label": body.label},
        status=201,
        headers={"Cache-Control": "no-store"},
    )


@routes.get("/admin/keys")
async def list_keys(request: web.Request) -> web.Response:
    ctx, who, _ = await _admin(request)
    keys = ctx.directory.company_keys(who.company_id)
    return web.json_response({"keys": [_key(k) for k in keys]})


def _key(key: AdminKey) -> dict[str, Any]:
    return {"key_id": key.key_id, "label": key.label, "revoked": not key.live,
            "issued_by": key.issued_by}  # fmt: skip


@routes.delete("/admin/keys/{key_id}")
async def revoke_key(request: web.Request) -> web.Response:
    ctx, who, meta = await _admin(request)
    key_id = request.match_info["key_id"]
    if key_id not in ctx.directory.admin_keys:
        raise NotFound("no such admin key")
    await directory.revoke_admin_key(ctx, who.company_id, key_id, meta)
    return web.Response(status=204)


# --- connections ---------------------------------------------------------------------


@routes.get("/admin/connections")
async def list_connections(request: web.Request) -> web.Response:
    """The applications connected to the caller's company (consents it gave)."""
    ctx, who, _ = await _admin(request)
    found = []
    for (company_id, client_id), connection in ctx.policy.connections.items():
        if company_id != who.company_id:
            continue
        app = ctx.policy.apps.get(client_id)
        found.append(
            {
                "client_id": client_id,
                "application": app.name if app else None,
                "permissions": sorted(connection.permissions),
                "granted_by": connection.user_id,
            }
        )
    return web.json_response({"connections": sorted(found, key=lambda c: c["client_id"])})


@routes.delete("/admin/connections/{client_id}")
async def revoke_connection(request: web.Request) -> web.Response:
    """The connection goes, and every token issued through it dies with it."""
    ctx, who, meta = await _admin(request)
    await connections.revoke(ctx, who.company_id, request.match_info["client_id"], meta)
    return web.Response(status=204)
