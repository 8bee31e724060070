"""IP addresses as Tollgate accepts them: plain IPv4 or IPv6, IPv4-mapped read as IPv4."""

from __future__ import annotations

import ipaddress

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


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
