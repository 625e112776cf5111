"""What one ``egress`` entry of a policy means.

Owns: the grammar of an entry and its parsed form, :class:`EgressRule`::

    api.example.com:443        a DNS name, TCP port 443
    203.0.113.7:8000-8099      an IPv4 address, a port range
    [2001:db8::1]:443          an IPv6 address, in brackets
    198.51.100.0/24:*          a CIDR block, every port
    udp:203.0.113.7:4500       UDP, only with the explicit prefix

Must never: resolve a name or touch the network; a policy is plain data.
UDP to port 53 is refused here: names are resolved by the supervisor, never
by the sandbox, so a worker has no use for DNS and DNS would be a way out.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Literal

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
_LABEL = r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)"
_HOST_NAME = re.compile(rf"^{_LABEL}(\.{_LABEL})*\.?$")
_DNS_PORT = 53
ANY_PORT = (1, 65535)


@dataclass(frozen=True)
class EgressRule:
    """One allowed destination: a name or a network, a protocol and a port range."""

    protocol: Literal["tcp", "udp"]
    host: str | None  # a DNS name, resolved and pinned by the supervisor per worker
    network: IPNetwork | None  # an address or CIDR block named explicitly
    ports: tuple[int, int]  # inclusive range

    def covers(self, address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
        """Does this rule name ``address`` explicitly (by IP or CIDR)?"""
        return self.network is not None and address in self.network


def parse_egress(entry: str) -> EgressRule:
    """Parse one entry; ValueError saying what is wrong with it."""
    text = entry.strip()
    protocol: Literal["tcp", "udp"] = "tcp"
    if text.startswith("udp:"):
        protocol, text = "udp", text[4:]
    destination, port_text = _split_port(text)
    ports = _parse_ports(port_text)
    host, network = _parse_destination(destination)
    if protocol == "udp" and ports[0] <= _DNS_PORT <= ports[1]:
        raise ValueError("UDP to port 53 (DNS) is never allowed: the supervisor resolves names, not the sandbox")
    return EgressRule(protocol, host, network, ports)


def _split_port(text: str) -> tuple[str, str]:
    if text.startswith("["):
        destination, bracket, rest = text[1:].partition("]")
        if not bracket or not rest.startswith(":"):
            raise ValueError("expected [IPv6]:PORT")
        return destination, rest[1:]
    destination, colon, port = text.rpartition(":")
    if not colon or not destination:
        raise ValueError("expected HOST:PORT, IP:PORT, [IPv6]:PORT or CIDR:PORT")
    if ":" in destination:
        raise ValueError("write an IPv6 address in brackets: [addr]:PORT")
    return destination, port


def _parse_ports(text: str) -> tuple[int, int]:
    if text == "*":
        return ANY_PORT
    low, dash, high = text.partition("-")
    try:
        ports = (int(low), int(high) if dash else int(low))
    except ValueError:
        raise ValueError(f"port {text!r} is not a number, a range like 8000-8099, or *") from None
    if not (1 <= ports[0] <= ports[1] <= 65535):
        raise ValueError(f"port {text!r} must be between 1 and 65535, low to high")
    return ports


def _parse_destination(text: str) -> tuple[str | None, IPNetwork | None]:
    try:
        return None, ipaddress.ip_network(text, strict=True)
    except ValueError as exc:
        if "/" in text or text.replace(".", "").isdigit() or ":" in text:
            raise ValueError(f"{text!r} is not a valid address or CIDR block ({exc})") from None
    if not _HOST_NAME.match(text) or len(text) > 253:
        raise ValueError(f"{text!r} is not a DNS name, an IP address or a CIDR block")
    return text.rstrip(".").lower(), None
