"""What a user's consent records (RFC 6749 §4.1.1 and §4.1.2): the company's connection to the
application and a single-use code for the client. Values in, a decision out.

The rules:
- A company has one connection per application, and it only grows by consent: it holds
  every permission any of its users approved (less what the application has lost since).
  A later, narrower consent by another user adds nothing and takes nothing away, so a
  grant already given keeps what it had, and a token and its refresh agree.
- Each code (and so each token family) carries only what its own user approved.
- Only a company admin may add a permission other than `*:read` (`invoices:write`, and
  any other verb) to the connection; once an admin has, members' consents may include it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from service import events as ev
from service.domain import streams
from service.domain.grants import CODE_TTL, Record
from service.domain.state import AppState, ConnectionState
from service.errors import Forbidden

ADMIN = "admin"


class AdminApprovalRequired(Forbidden):
    """A member asked to add a permission that only an admin may approve."""

    error = "access_denied"

    def __init__(self, permissions: list[str]) -> None:
        super().__init__(
            "only a company admin can allow " + ", ".join(permissions) + "; ask an admin of "
            "your company to connect the application with it first"
        )
        self.permissions = permissions


def needs_admin(permissions: Iterable[str], held: frozenset[str]) -> list[str]:
    """What of `permissions` only an admin may approve: every permission but a `:read`
    one, that the company's connection does not hold already."""
    return [p for p in permissions if not p.endswith(":read") and p not in held]


@dataclass(frozen=True)
class Consent:
    """Record `grant`, then `code`. When the connection already holds every approved
    permission (Allow pressed twice, a reload, another user of the company),
    `code_alone` records only the code, on condition that the connection is still as it
    was; if it changed meanwhile, the grant is recorded after all, so a code never points
    at a connection that is gone."""

    grant: Record
    code: Record
    code_alone: Record | None


def approve(
    app: AppState,
    company_id: str,
    user_id: str,
    permissions: list[str],
    redirect_uri: str,
    code_challenge: str | None,
    code_hash: str,
    connection: ConnectionState | None,
    now: int,
    *,
    role: str,
    stream_version: int | None = None,
    dpop_jkt: str | None = None,
    redirect_uri_given: bool = True,
) -> Consent:
    """`connection`: the company's connection as the caller's model holds it;
    `stream_version`: the connection stream's version that model reflects (None: record
    whatever it is). The grant is the union of what the connection holds and `permissions`."""
    held = connection.permissions if connection is not None else frozenset()
    if role != ADMIN and (refused := needs_admin(permissions, held)):
        raise AdminApprovalRequired(refused)
    ids = {"company_id": company_id, "client_id": app.client_id}
    stream = streams.connection(company_id, app.client_id)
    union = [*sorted(held - frozenset(permissions)), *permissions]
    granted = ev.ConnectionGranted(**ids, user_id=user_id, permissions=union)
    issued = ev.AuthorizationCodeIssued(
        **ids,
        user_id=user_id,
        code_hash=code_hash,
        redirect_uri=redirect_uri,
        permissions=permissions,
        code_challenge=code_challenge,
        expires_at=now + CODE_TTL,
        dpop_jkt=dpop_jkt,
        redirect_uri_given=redirect_uri_given,
    )
    code = Record(streams.code(code_hash), 0, (issued,))
    alone = None
    if connection is not None and frozenset(permissions) <= connection.permissions:
        alone = Record(code.stream, 0, (issued,), ((stream, connection.version),))
    return Consent(Record(stream, stream_version, (granted,)), code, alone)
