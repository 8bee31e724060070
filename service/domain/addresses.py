"""IP addresses as Tollgate accepts them: plain IPv4 or IPv6, IPv4-mapped read as IPv4."""

from __future__ import annotations

import ipaddress

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def ip_address(text: str) -> IPAddress:
    """Parse one address; ValueError if it is not a plain one.

    An IPv6 zone ID ("fe80::1%eth0") is refused: `ipaddress` accepts any characters after
    the "%", newlines included, and an address reaches events, logs and email headers.
    A zone only names a local interface, so no allow list or caller needs one.
    """
    if "%" in text:
        raise ValueError("an IPv6 zone ID is not accepted")
    address = ipaddress.ip_address(text)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        return address.ipv4_mapped
    return address


def unmapped(network: IPNetwork) -> IPNetwork:
    """An IPv4-mapped IPv6 range as the IPv4 range it maps (`::ffff:10.0.0.0/104` is
    `10.0.0.0/8`), as every address compared with it is read. (A range wider than the
    mapped space has no `::ffff:` network address: it stays IPv6.)"""
    if isinstance(network, ipaddress.IPv6Network) and network.network_address.ipv4_mapped:
        mapped = network.network_address.ipv4_mapped
        return ipaddress.IPv4Network(f"{mapped}/{network.prefixlen - 96}")
    return network
