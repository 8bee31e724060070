"""The caller's IP address: the socket peer, or, when the peer is a trusted proxy, the
right-most address in X-Forwarded-For that is not itself a trusted proxy."""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Sequence

from aiohttp import web

from service.domain import addresses

IPAddress = addresses.IPAddress
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@functools.lru_cache(maxsize=4096)
def _parse(value: str) -> IPAddress | None:
    """Cached: a service sees the same few addresses over and over (this is per request)."""
    value = value.strip()
    if value.startswith("[") and "]" in value:  # "[2001:db8::1]:443"
        value = value[1 : value.index("]")]
    elif value.count(":") == 1:  # "192.0.2.1:443"
        value = value.split(":", 1)[0]
    try:
        return addresses.ip_address(value)
    except ValueError:
        return None


@functools.lru_cache(maxsize=4096)
def _peer(peer: str) -> str:
    """The socket peer as an address is written (or as it came, if it is none)."""
    address = _parse(peer)
    return (peer or "unknown") if address is None else str(address)


def _trusted(address: IPAddress, proxies: Sequence[IPNetwork]) -> bool:
    return any(address.version == net.version and address in net for net in proxies)


def resolve(peer: str | None, forwarded_for: Sequence[str], proxies: Sequence[IPNetwork]) -> str:
    """`forwarded_for`: every X-Forwarded-For header line, in order received."""
    address = _parse(peer or "")
    if address is None:
        return peer or "unknown"
    if not proxies or not _trusted(address, proxies):
        return str(address)  # a header from an untrusted peer changes nothing
    hops = [hop for line in forwarded_for for hop in line.split(",") if hop.strip()]
    for hop in reversed(hops):
        hop_address = _parse(hop)
        if hop_address is None:
            return str(address)  # garbage in the chain: believe only the peer
        if not _trusted(hop_address, proxies):
            return str(hop_address)
        address = hop_address
    return str(address)


def peer_trusted(request: web.Request, proxies: Sequence[IPNetwork]) -> bool:
    """Whether the socket peer is a trusted proxy (what it says of the request is believed)."""
    if not proxies:
        return False
    address = _parse(request.remote or "")
    return address is not None and _trusted(address, proxies)


def client_ip(request: web.Request, proxies: Sequence[IPNetwork]) -> str:
    if not proxies:  # nearly always a peer seen before: one cached look
        return _peer(request.remote or "")
    return resolve(request.remote, request.headers.getall("X-Forwarded-For", []), proxies)
