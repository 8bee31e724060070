"""POST /policy/check: the gateway's decision for resource servers that do not sit
behind it. Authenticated with a resource-server key. A resource server whose client sent
`Authorization: DPoP` passes the client's DPoP proof on (`dpop_proof`) with the method and
the URL the client called (`htm`, `htu`, RFC 9449 §4.3)."""

from __future__ import annotations

from typing import Annotated

import msgspec
from aiohttp import web

from service.domain import addresses, credentials, dpop
from service.errors import InvalidRequest, Unauthorized
from service.oauth import credentials as authorization
from service.oauth.dpop import Presented
from service.web.bodies import json_body
from service.web.keys import CONTEXT, metadata

routes = web.RouteTableDef()


class CheckIn(msgspec.Struct, forbid_unknown_fields=True):
    token: Annotated[str, msgspec.Meta(max_length=200)]
    ip: Annotated[str, msgspec.Meta(max_length=64)]
    permission: Annotated[str, msgspec.Meta(max_length=100)] | None = None
    dpop_proof: Annotated[str, msgspec.Meta(max_length=dpop.MAX_PROOF)] | None = None
    htm: Annotated[str, msgspec.Meta(max_length=16)] | None = None
    htu: Annotated[str, msgspec.Meta(max_length=2048)] | None = None


def presented(body: CheckIn) -> Presented | None:
    """The client's DPoP proof and its request, when the resource server passed one on."""
    if body.dpop_proof is None:
        return None
    if not body.htm or not body.htu:
        raise InvalidRequest("htm and htu are required with dpop_proof")
    return Presented(body.dpop_proof, body.htm, body.htu)


@routes.post("/policy/check")
async def check(request: web.Request) -> web.Response:
    ctx = request.app[CONTEXT]
    found = authorization.parse(request.headers.get("Authorization"))
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
    meta = metadata(request, f"resource_server:{server}")
    allowed = await ctx.policy_point.decide(
        body.token, ip, body.permission, "policy_check", meta, presented(body)
    )
    token = allowed.token
    return web.json_response(
        {
            "allow": True,
            "company_id": token.company_id,
            "client_id": token.client_id,
            "permissions": sorted(allowed.permissions),
            "expires_at": token.expires_at,
        }
    )
