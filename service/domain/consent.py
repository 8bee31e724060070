"""What a user's consent records (RFC 6749 §4.1.1 and §4.1.2): the company's connection to the
application and a single-use code for the client. Values in, a decision out."""

from __future__ import annotations

from dataclasses import dataclass

from service import events as ev
from service.domain import streams
from service.domain.grants import CODE_TTL, Record
from service.domain.state import AppState, ConnectionState


@dataclass(frozen=True)
class Consent:
    """Record `grant`, then `code`. When the connection already holds exactly the approved
    permissions (Allow pressed twice, a reload, a retry after a failed redirect),
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
) -> Consent:
    ids = {"company_id": company_id, "client_id": app.client_id}
    stream = streams.connection(company_id, app.client_id)
    granted = ev.ConnectionGranted(**ids, user_id=user_id, permissions=permissions)
    issued = ev.AuthorizationCodeIssued(
        **ids,
        user_id=user_id,
        code_hash=code_hash,
        redirect_uri=redirect_uri,
        permissions=permissions,
        code_challenge=code_challenge,
        expires_at=now + CODE_TTL,
    )
    code = Record(streams.code(code_hash), 0, (issued,))
    alone = None
    if connection is not None and connection.permissions == frozenset(permissions):
        alone = Record(code.stream, 0, (issued,), ((stream, connection.version),))
    return Consent(Record(stream, None, (granted,)), code, alone)
