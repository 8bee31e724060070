"""Client authentication at the token, revocation and introspection endpoints:
HTTP Basic with form-urlencoded credentials (RFC 6749 §2.3.1), or client_id and
client_secret in the body; never both. Secrets are compared in constant time."""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from urllib.parse import unquote_plus

import structlog

from projections.memory import AppState
from service import events as ev
from service.context import Context
from service.domain import credentials
from service.eventlog import Metadata
from service.oauth.errors import InvalidClient, InvalidRequest

MAX_CREDENTIAL = 256

log = structlog.get_logger(__name__)


def credentials_from(
    authorization: str | None, params: Mapping[str, str]
) -> tuple[str, str] | None:
    """(client_id, client_secret) from the Basic header or the body; None if neither.
    An empty parameter counts as omitted (RFC 6749 §3.1)."""
    in_body = bool(params.get("client_secret"))
    if authorization is not None:
        scheme, _, value = authorization.strip().partition(" ")
        if scheme.lower() != "basic":
            raise InvalidClient("use HTTP Basic or client_id and client_secret in the body")
        if in_body:
            raise InvalidRequest("use one client authentication method, not two (RFC 6749 §2.3)")
        try:
            decoded = base64.b64decode(value.strip(), validate=True).decode()
        except (binascii.Error, ValueError):  # also non-ASCII input, and bad UTF-8
            raise InvalidClient("malformed Basic credentials") from None
        client_id, sep, secret = decoded.partition(":")
        if not sep:
            raise InvalidClient("malformed Basic credentials")
        # RFC 6749 §2.3.1: both parts are form-urlencoded before base64.
        return unquote_plus(client_id), unquote_plus(secret)
    if in_body:
        return params.get("client_id", ""), params["client_secret"]
    return None


async def authenticate(
    ctx: Context, client_id: str, secret: str, ip: str, meta: Metadata
) -> AppState:
    if not client_id or len(client_id) > MAX_CREDENTIAL or len(secret) > MAX_CREDENTIAL:
        raise InvalidClient()
    app = ctx.policy.apps.get(client_id)
    if app is None:
        await ctx.refresh()  # created a moment ago through another process?
        app = ctx.policy.apps.get(client_id)
    if app is None:
        credentials.matches(secret, "0" * 64)  # the same work for an unknown client
        raise InvalidClient()
    if credentials.matches(secret, app.secret_hash):
        return app
    if any(credentials.matches(secret, old) for old in app.previous_secret_hashes):
        # A rotated-away secret: refused, and recorded as a security signal for admins.
        event = ev.OldClientSecretUsed(
            company_id=app.company_id,
            client_id=app.client_id,
            ip=ip,
            secret_version=app.secret_version,
        )
        await ctx.eventlog.append(f"secret-use-{app.client_id}", None, [event], meta)
        log.warning(
            "security.old_client_secret_used",
            company_id=app.company_id,
            client_id=app.client_id,
            ip=ip,
            secret_version=app.secret_version,
        )
        raise InvalidClient("this client secret has been rotated; use the new one")
    # A known client with a wrong secret: guessing, or a deployment with a stale secret.
    log.warning(
        "security.client_secret_wrong", company_id=app.company_id, client_id=app.client_id, ip=ip
    )
    raise InvalidClient()
