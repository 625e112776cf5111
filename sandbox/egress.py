"""The supervisor's half of egress: what a tenant's worker may reach.

Owns: whether this host can enforce egress (:func:`host_support`), resolving
and pinning names for one worker (:func:`pin`), rendering the nftables rules
loaded into that worker's network namespace, and removing pasta processes a
dead supervisor left behind (registered with ``sandbox.leftovers``). The zygote does the
installing (``runtime.egress``).

How a worker with egress is wired: its own network namespace holds a tap
device served by pasta, a user-mode network stack that opens ordinary
sockets on the supervisor's side. In that namespace, before the worker
exists, an nftables table lets out exactly the allowed (address, port)
pairs and rejects everything else at once (a TCP reset or an ICMP
"administratively prohibited", so code sees ``ECONNREFUSED`` or ``EPERM``
rather than a hang). The worker holds no capability over the namespace, and
seccomp refuses the netlink socket it would need to change the rules.

Names are resolved here, once per new worker, and pinned: in the worker's
own ``/etc/hosts`` and as the addresses of its rules. The worker has no DNS
server (no ``resolv.conf``, and UDP to port 53 is never allowed), so DNS can
neither carry data out nor be rebound. An answer in loopback, link-local or
private space is dropped unless an IP or CIDR entry names it, so a DNS
answer cannot smuggle in an internal address.

Must never: put a secret into what it renders (it goes through the zygote),
or let a worker start with a rule it could not render: every entry is
rendered or refused, and the chain's policy is drop.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import re
import shutil
import signal
import socket
from dataclasses import dataclass

from sandbox import leftovers
from sandbox.errors import ConfinementUnavailable
from sandbox.policies.egress import EgressRule, IPNetwork, parse_egress

log = logging.getLogger(__name__)

PRIVATE_NETWORKS = tuple(
    ipaddress.ip_network(n)
    for n in (
        "127.0.0.0/8",
        "::1/128",
        "169.254.0.0/16",
        "fe80::/10",
        "10.0.0.0/8",
        "172.16.0.0/12",
        "192.168.0.0/16",
        "fc00::/7",
        "0.0.0.0/8",  # "this host": connecting to 0.0.0.0 reaches the host itself
        "::/128",
    )
)
_RESOLVE_TIMEOUT_S = 5.0
_MARKER_PREFIX = "sandbox-egress"
_SEARCH_PATH = ("/usr/sbin", "/usr/bin", "/sbin", "/bin")
_TABLE = "sandbox_egress"


@dataclass(frozen=True)
class Tools:
    """Where this host's pasta and nft are."""

    pasta: str
    nft: str


def find_tools() -> Tools | str:
    """The helpers egress needs, or why they are missing."""
    found = {
        name: shutil.which(name) or shutil.which(name, path=os.pathsep.join(_SEARCH_PATH)) for name in ("pasta", "nft")
    }
    missing = [name for name, path in found.items() if path is None]
    if missing:
        packages = {"pasta": "passt", "nft": "nftables"}
        return f"{' and '.join(missing)} not found (Debian packages: {', '.join(packages[m] for m in missing)})"
    return Tools(pasta=found["pasta"] or "", nft=found["nft"] or "")


def host_support() -> str:
    """ "on: ..." if this process could start egress workers, else "off: why".

    Only what can be seen without trying; the layer probe then starts a real
    worker with egress to settle it (``sandbox.layers``).
    """
    tools = find_tools()
    if isinstance(tools, str):
        return f"off: {tools}"
    if os.geteuid() != 0 and not os.access("/dev/net/tun", os.R_OK | os.W_OK):
        return (
            f"off: /dev/net/tun is not readable and writable by uid {os.geteuid()} "
            "(pasta needs it; it is usually mode 0666)"
        )
    return "on: pasta + nftables in the worker's own network namespace"


def rules_of(entries: list[str]) -> list[EgressRule]:
    return [parse_egress(entry) for entry in entries]


def marker() -> str:
    """argv[0] of this supervisor's pasta processes: its owner tag (``sandbox.leftovers``),
    so that a later supervisor can tell a dead owner's leftovers from a live one's."""
    # pasta picks its mode from argv[0], which must contain "pasta".
    return f"{_MARKER_PREFIX}-{leftovers.owner_tag()}-pasta"


async def pin(rules: list[EgressRule]) -> dict[str, object]:
    """Resolve the names of ``rules`` now and render one worker's egress config.

    Called for each new worker: that is the re-resolution rule. A name that
    does not resolve, or only to refused addresses, gets no rule and no
    hosts line, so connecting to it fails at once.
    """
    tools = find_tools()
    if isinstance(tools, str):
        raise ConfinementUnavailable(f"egress: {tools}", layer="egress", reason=tools)
    explicit = [rule for rule in rules if rule.network is not None]
    names = sorted({rule.host for rule in rules if rule.host is not None})
    answers = await asyncio.gather(*(_resolve(name) for name in names))
    pinned: dict[str, list[ipaddress.IPv4Address | ipaddress.IPv6Address]] = {}
    for name, addresses in zip(names, answers, strict=True):
        kept = [a for a in addresses if not is_private(a) or any(rule.covers(a) for rule in explicit)]
        if len(kept) < len(addresses):
            log.warning("egress: %s resolved to refused private addresses %s", name, sorted(set(addresses) - set(kept)))
        pinned[name] = kept
    lines = ["127.0.0.1 localhost", "::1 localhost"]
    lines += [f"{address} {name}" for name, addresses in pinned.items() for address in addresses]
    destinations: list[tuple[EgressRule, list[IPNetwork]]] = []
    for rule in rules:
        if rule.host is not None:
            destinations.append((rule, [ipaddress.ip_network(a) for a in pinned[rule.host]]))
        elif rule.network is not None:
            destinations.append((rule, [rule.network]))
    return {
        "hosts": "\n".join(lines) + "\n",
        "nft": render_nft(destinations),
        "pinned": {name: [str(a) for a in addresses] for name, addresses in pinned.items()},
        "udp": any(rule.protocol == "udp" for rule in rules),
        "ipv6": any(net.version == 6 for _, nets in destinations for net in nets),
        "pasta_path": tools.pasta,
        "nft_path": tools.nft,
        "marker": marker(),
    }


def render_nft(destinations: list[tuple[EgressRule, list[IPNetwork]]]) -> str:
    """The worker namespace's table: allowed (network, protocol, ports) out, the rest rejected at once."""
    accepts = []
    for rule, networks in destinations:
        ports = f"{rule.ports[0]}" if rule.ports[0] == rule.ports[1] else f"{rule.ports[0]}-{rule.ports[1]}"
        for network in networks:
            family = "ip" if network.version == 4 else "ip6"
            accepts.append(f"    {family} daddr {network} {rule.protocol} dport {ports} accept")
    return "\n".join(
        [
            f"table inet {_TABLE} {{",
            "  chain output {",
            "    type filter hook output priority 0; policy drop;",
            # Neighbour discovery with pasta's side of the tap; without it IPv6 cannot work at all.
            "    icmpv6 type { nd-neighbor-solicit, nd-neighbor-advert, nd-router-solicit } accept",
            *accepts,
            # The reject below answers the worker over lo, and that answer passes
            # this chain too: let exactly resets and unreachable errors through.
            '    oif "lo" tcp flags rst accept',
            '    oif "lo" icmp type destination-unreachable accept',
            '    oif "lo" icmpv6 type destination-unreachable accept',
            "    meta l4proto tcp reject with tcp reset",
            "    reject with icmpx admin-prohibited",
            "  }",
            "  chain input {",
            "    type filter hook input priority 0; policy drop;",
            "    icmpv6 type { nd-neighbor-solicit, nd-neighbor-advert, nd-router-advert } accept",
            # The resets and errors of the output chain's reject; lo carries nothing else.
            '    iif "lo" accept',
            # Otherwise only replies: nothing outside can open a connection to the worker.
            "    ct state established,related accept",
            "  }",
            "}",
            "",
        ]
    )


async def _resolve(name: str) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    loop = asyncio.get_running_loop()
    try:
        infos = await asyncio.wait_for(
            loop.getaddrinfo(name, None, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP), _RESOLVE_TIMEOUT_S
        )
    except (OSError, TimeoutError) as exc:
        log.warning("egress: cannot resolve %s: %s", name, exc)
        return []
    addresses = []
    for _, _, _, _, sockaddr in infos:
        address = ipaddress.ip_address(str(sockaddr[0]).partition("%")[0])
        if address not in addresses:
            addresses.append(address)
    return addresses


def is_private(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return any(address in network for network in PRIVATE_NETWORKS)


_MARKER = re.compile(rf"^{_MARKER_PREFIX}-([0-9a-f]+)-pasta$")


def _remove_dead_pasta(dead: frozenset[str]) -> bool:
    """Kill pasta processes whose supervisor is dead (``sandbox.leftovers`` calls this).

    A supervisor's pasta processes die with its zygote's PID namespace, so
    this finds something only if that failed. Only processes that really run
    pasta and carry a dead owner's tag are killed. Nothing else of egress
    lives on the host: the interfaces and rules are inside namespaces that
    vanish with their last process.
    """
    tools = find_tools()
    if isinstance(tools, str):
        return True
    # pasta may re-exec itself as a build for this CPU (passt.avx2), from the same directory.
    pasta_dir = os.path.dirname(os.path.realpath(tools.pasta))
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv0 = f.read().split(b"\0", 1)[0].decode(errors="replace")
            match = _MARKER.match(argv0)
            if match is None or match[1] not in dead:
                continue
            exe = os.path.realpath(f"/proc/{entry}/exe")
            if os.path.dirname(exe) != pasta_dir or not os.path.basename(exe).startswith(("pasta", "passt")):
                continue
            os.kill(int(entry), signal.SIGKILL)
        except OSError:
            continue  # gone meanwhile, or not ours to look at
    return True  # SIGKILL is final; a process still exiting holds nothing of the owner's


leftovers.register("pasta processes", _remove_dead_pasta)
