"""POST /policy/check: the gateway's decision for resource servers that do not sit
behind it. Authenticated with a resource-server key. A resource server whose client sent
`Authorization: DPoP` passes the client's DPoP proof on (`dpop_proof`) with the method and
the URL the client called (`htm`, `htu`, RFC 9449 §4.3). With DPOP_NONCE=required the
answer names the nonce the client is to use (`dpop_nonce`), for the resource server to
send as DPoP-Nonce; a proof without a valid one is refused with use_dpop_nonce."""

from __future__ import annotations

from typing import Annotated

import msgspec
from aiohttp import web

from service.domain import addresses, credentials, dpop
from service.errors import InvalidRequest, Unauthorized
from service.oauth import credentials as authorization
from service.oauth.dpop import Nonces, Presented
from service.oauth.errors import BEARER_REALM, OAuthError
from service.web.bodies import json_body
from service.web.keys import CONTEXT, authorization_header, metadata

routes = web.RouteTableDef()


class CheckIn(msgspec.Struct, forbid_unknown_fields=True):
    token: Annotated[str, msgspec.Meta(max_length=200)]
    ip: Annotated[str, msgspec.Meta(max_length=64)]
    permission: Annotated[str, msgspec.Meta(max_length=100)] | None = None
    dpop_proof: Annotated[str, msgspec.Meta(max_length=dpop.MAX_PROOF)] | None = None
    htm: Annotated[str, msgspec.Meta(max_length=16)] | None = None
    htu: Annotated[str, msgspec.Meta(max_length=2048)] | None = None


def presented(body: CheckIn, nonces: Nonces | None = None) -> Presented | None:
    """The client's DPoP proof and its request, when the resource server passed one on;
    `nonces`: the nonces the proof must carry one of (DPOP_NONCE=required)."""
    if body.dpop_proof is None:
        return None
    if not body.htm or not body.htu:
        raise InvalidRequest("htm and htu are required with dpop_proof")
    return Presented(body.dpop_proof, body.htm, body.htu, nonces)


@routes.post("/policy/check")
async def check(request: web.Request) -> web.Response:
    ctx = request.app[CONTEXT]
    found = authorization.parse(authorization_header(request, InvalidRequest))
    bearer = isinstance(found, authorization.Bearer)
    server = None
    if isinstance(found, authorization.Bearer):
        server = await ctx.lookups.resource_server(credentials.digest(found.value))
    if server is None:
        raise Unauthorized(
            "a resource-server key is required",
            realm="tollgate-policy",
            sent=bearer,  # no error code unless a key came
        )
    body = await json_body(request, CheckIn)
    try:
        ip = str(addresses.ip_address(body.ip.strip()))
    except ValueError:
        raise InvalidRequest("ip: not an IP address") from None
    if body.permission is not None and body.permission not in ctx.catalogue:
        # Named in the answer's challenge (RFC 6750 §3): only a name of the catalogue's.
        raise InvalidRequest("permission: not one of the permission catalogue's")
    proof = presented(body, ctx.dpop_nonces)
    point = ctx.policy_point
    try:
        allowed = point.allowed_now(
            body.token, ip, body.permission, "policy_check", bearer=proof is None
        )
        if allowed is None:
            meta = metadata(request, f"resource_server:{server}")
            allowed = await point.decide(
                body.token, ip, body.permission, "policy_check", meta, proof
            )
    except dpop.DpopNonceRequired as refused:
        # The resource server answers its client 401 with the challenge and DPoP-Nonce
        # (RFC 9449 §9): the nonce is in the answer for it to relay.
        answer = {
            "error": refused.error,
            "error_description": refused.description,
            "dpop_nonce": refused.nonce,
        }
        return web.json_response(answer, status=refused.status, headers=refused.headers)
    except OAuthError as exc:
        # A request made with the DPoP scheme is refused in it (RFC 9449 §7.1), as the
        # gateway refuses it: a missing permission, a disallowed address, and the rest.
        if proof is not None:
            dpop.answered_in_dpop(exc, BEARER_REALM)
        raise
    token = allowed.token
    decision = {
        "allow": True,
        "company_id": token.company_id,
        "client_id": token.client_id,
        "permissions": sorted(allowed.permissions),
        "expires_at": token.expires_at,
    }
    if proof is not None and proof.nonces is not None:
        decision["dpop_nonce"] = await proof.nonces.current()  # for DPoP-Nonce (§9)
    return web.json_response(decision)
