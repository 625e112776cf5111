"""Egress: a tenant reaches exactly the (address, port) pairs its policy names.

The Sandbox under test runs inside ``tests/egress/world.py``, in a throwaway
network, PID and mount namespace whose only other host is an "upstream"
namespace holding every address connected to (see that module). The world
runs once per module and reports what it saw; each test judges one part.
"""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from sandbox.egress import is_private, pin, render_nft, rules_of
from sandbox.errors import ConfinementUnavailable
from sandbox.policies import Policy
from sandbox.policies.egress import parse_egress
from sandbox.profile import HostSupport, build_profile

REPO = Path(__file__).resolve().parent.parent
WORLD = REPO / "tests" / "egress" / "world.py"
SANITY_BOUND_S = 1.0  # far above a refusal (well under a millisecond here), far below a hang (5 s timeout)
MISSING = [tool for tool in ("unshare", "pasta", "nft", "ip") if shutil.which(tool, path="/usr/sbin:/usr/bin") is None]

needs_world = pytest.mark.skipif(
    os.geteuid() != 0 or bool(MISSING),
    reason="needs root and " + ", ".join(MISSING or ["unshare"]) + " (.ci/run installs passt and nftables)",
)


@pytest.fixture(scope="module")
def world() -> dict:
    command = ["unshare", "--net", "--pid", "--mount", "--fork", "--kill-child", "--mount-proc"]
    done = subprocess.run(
        [*command, sys.executable, str(WORLD), str(REPO)], capture_output=True, text=True, timeout=240
    )
    assert done.stdout, f"the world printed nothing: {done.stderr[-4000:]}"
    report = json.loads(done.stdout.splitlines()[-1])
    assert report.get("error") is None, report["error"]
    return report


# --- the policy field ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("entry", "protocol", "host", "network", "ports"),
    [
        ("api.example.com:443", "tcp", "api.example.com", None, (443, 443)),
        ("203.0.113.7:8000-8099", "tcp", None, "203.0.113.7/32", (8000, 8099)),
        ("[2001:db8::1]:443", "tcp", None, "2001:db8::1/128", (443, 443)),
        ("198.51.100.0/24:*", "tcp", None, "198.51.100.0/24", (1, 65535)),
        ("udp:203.0.113.7:4500", "udp", None, "203.0.113.7/32", (4500, 4500)),
    ],
)
def test_entries_parse(entry, protocol, host, network, ports):
    rule = parse_egress(entry)
    assert (rule.protocol, rule.host, rule.network, rule.ports) == (
        protocol,
        host,
        None if network is None else ipaddress.ip_network(network),
        ports,
    )


@pytest.mark.parametrize(
    ("entry", "complaint"),
    [
        ("example.com", "expected HOST:PORT"),
        ("example.com:0", "between 1 and 65535"),
        ("example.com:90-80", "low to high"),
        ("example.com:http", "not a number"),
        ("::1:80", "in brackets"),
        ("300.1.1.1:80", "not a valid address"),
        ("10.0.0.1/8:80", "not a valid address"),
        ("bad_name:80", "not a DNS name"),
        ("udp:203.0.113.7:53", "DNS"),
        ("udp:203.0.113.7:*", "DNS"),
    ],
)
def test_malformed_entry_is_a_policy_error_naming_it(entry, complaint):
    with pytest.raises(ValueError) as caught:
        Policy(egress=["api.example.com:443", entry])
    assert repr(entry) in str(caught.value) and complaint in str(caught.value)


def test_egress_with_network_true_is_refused():
    with pytest.raises(ValueError, match="egress applies only when network = false"):
        Policy(network=True, egress=["api.example.com:443"])


def test_egress_layers_cannot_be_skipped():
    with pytest.raises(ValueError, match="cannot be skipped"):
        Policy(egress=["api.example.com:443"], skip_layers=["seccomp"])


def test_host_without_egress_refuses_the_policy_naming_the_layer():
    layers = dict.fromkeys(("rlimits", "identity", "pidns", "mountns", "netns", "ipcns", "seccomp"), "on")
    host = HostSupport(layers, root=True, pid_namespace=True, egress="off: pasta not found (Debian packages: passt)")
    build_profile("plain", Policy(), host)  # no egress: nothing to enforce
    with pytest.raises(ConfinementUnavailable) as caught:
        build_profile("calls-out", Policy(egress=["203.0.113.7:443"]), host)
    assert caught.value.layer == "egress" and "pasta not found" in caught.value.reason


@pytest.mark.parametrize(
    ("address", "private"),
    [
        ("127.0.0.5", True),
        ("::1", True),
        ("169.254.169.254", True),
        ("fe80::1", True),
        ("10.1.2.3", True),
        ("172.31.0.1", True),
        ("192.168.1.1", True),
        ("fd00::1", True),
        ("::ffff:10.0.0.1", True),
        ("0.0.0.0", True),
        ("198.51.100.10", False),
        ("2001:db8::1", False),
        ("172.32.0.1", False),
    ],
)
def test_private_answers(address, private):
    assert is_private(ipaddress.ip_address(address)) is private


async def test_explicit_entries_are_pinned_without_resolving():
    pinned = await pin(rules_of(["10.203.0.2:8080", "[2001:db8::1]:443"]))
    assert pinned["pinned"] == {}
    assert "ip daddr 10.203.0.2/32 tcp dport 8080 accept" in pinned["nft"]
    assert "ip6 daddr 2001:db8::1/128 tcp dport 443 accept" in pinned["nft"]
    assert pinned["ipv6"] and not pinned["udp"]


def test_rules_reject_everything_else():
    text = render_nft([(parse_egress("203.0.113.7:8000-8099"), [ipaddress.ip_network("203.0.113.7/32")])])
    assert "policy drop;" in text
    assert "ip daddr 203.0.113.7/32 tcp dport 8000-8099 accept" in text
    assert text.index("accept\n    oif") < text.index("reject with tcp reset") < text.index("reject with icmpx")


# --- in the world ----------------------------------------------------------------------


@needs_world
def test_host_provides_egress(world):
    assert world["host_egress"].startswith("on: pasta + nftables")


@needs_world
def test_doctor_reports_the_egress_mechanism(world):
    assert world["doctor"]["egress"] == world["host_egress"]


@needs_world
def test_allowed_port_answers(world):
    allowed = world["probe_egress"]["results"]["allowed"]
    assert allowed["stage"] == "connected" and allowed["answer"] == "upstream 10.203.0.2:8080", allowed


@needs_world
def test_allowed_ipv6_address_answers(world):
    allowed = world["probe_egress"]["results"]["ipv6_allowed"]
    assert allowed["stage"] == "connected" and allowed["answer"] == "upstream fd00:203::2:8080", allowed


@needs_world
def test_aiohttp_get_pattern(world):
    assert world["aiohttp"] == {"status": 200, "body": "upstream 198.51.100.10:8080"}
    assert "Cannot connect to host 10.203.0.2:8081" in world["aiohttp_other_port"]["error"]


@needs_world
def test_asyncpg_against_postgresql(world):
    if not world["postgres"]:
        pytest.skip("PostgreSQL is not installed (.ci/run installs it)")
    assert world["asyncpg"] == {"answer": 42}


@needs_world
@pytest.mark.parametrize(
    "target",
    ["other_port", "loopback", "world", "metadata", "private", "public_b", "ipv6_loopback", "ipv6", "ipv6_other_port"],
)
def test_everything_else_is_refused_at_once(world, target):
    outcome = world["probe_egress"]["results"][target]
    assert outcome["stage"] == "connect"
    assert outcome["error"] in ("ECONNREFUSED", "EPERM", "ENETUNREACH", "EHOSTUNREACH", "EACCES")
    assert outcome["s"] < SANITY_BOUND_S


@needs_world
def test_udp_only_where_a_udp_entry_allows(world):
    results = world["probe_egress"]["results"]
    assert results["udp_allowed"]["answer"] == "echo ping"
    assert results["udp_other_port"]["error"] == "EPERM" and results["udp_other_port"]["s"] < SANITY_BOUND_S


@needs_world
@pytest.mark.parametrize("kind", ["raw", "netlink", "packet"])
def test_raw_netlink_and_packet_sockets_are_refused(world, kind):
    outcome = world["probe_egress"]["results"][kind]
    assert (outcome["stage"], outcome["error"]) == ("socket", "EAFNOSUPPORT")


@needs_world
def test_worker_holds_no_capability_over_its_namespace(world):
    capabilities = world["probe_egress"]["capabilities"]
    assert capabilities["CapEff"] == capabilities["CapPrm"] == capabilities["CapAmb"] == 0
    assert capabilities["CapBnd"] == 0  # not even after an exec


@needs_world
def test_no_listening_socket(world):
    assert world["probe_egress"]["results"]["listen"]["error"] == "EPERM"


@needs_world
def test_tenant_without_egress_reaches_nothing(world):
    results = world["probe_none"]["results"]
    assert {outcome["stage"] for outcome in results.values()} == {"socket"}
    # EACCES: the worker rewords seccomp's EAFNOSUPPORT into the policy's reason when a tenant has no network.
    assert {outcome["error"] for outcome in results.values()} == {"EACCES"}


@needs_world
def test_names_are_pinned_in_the_worker(world):
    probe = world["probe_egress"]
    assert probe["resolved"]["api.egress.test"] == ["198.51.100.10"]
    assert "198.51.100.10 api.egress.test" in probe["hosts"]
    # The host re-pointed the name; the same worker keeps what was pinned for it.
    after = world["after_repoint"]
    assert after["worker_pid"] == probe["worker_pid"]
    assert after["resolved"] == ["198.51.100.10"] and after["api"]["answer"] == "upstream 198.51.100.10:8080"
    # A new worker resolves again.
    assert world["new_worker"]["resolved"] == ["198.51.100.11"]
    assert world["new_worker"]["api"]["answer"] == "upstream 198.51.100.11:8080"


@needs_world
def test_a_name_answering_a_private_address_is_refused(world):
    probe = world["probe_egress"]
    assert probe["resolved"]["private.egress.test"] == "gaierror"
    assert "private.egress.test" not in probe["hosts"]
    assert probe["results"]["private"]["error"] == "ECONNREFUSED"
    # Named explicitly by an IP entry, the same kind of answer is kept.
    assert probe["resolved"]["internal.egress.test"] == ["10.203.0.2"]


@needs_world
def test_nothing_left_after_close(world):
    before = world["network_before"]
    assert before["nft"] == "" and before["pasta"] == []
    assert world["network_after_close"] == before


@needs_world
def test_nothing_left_after_sigkill_of_the_supervisor(world):
    assert world["pasta_before_kill"], "the supervisor had no pasta process to leave behind"
    assert world["network_after_kill"] == world["network_before"]


@needs_world
def test_leftovers_of_a_dead_supervisor_are_removed(world):
    assert world["leftovers_running"] == {key: True for key in world["leftovers_running"]}
    assert world["leftovers_killed"] == {"dead_owner": True, "live_owner": False}


@needs_world
def test_unprivileged_refuses_without_a_usable_tun_device(world):
    report = world["unprivileged_host_tun"]
    if report["tun_usable_by_65534"]:
        assert report["outcome"] == "ran" and report["results"]["allowed"]["stage"] == "connected"
    else:
        assert report["outcome"] == "refused" and report["layer"] == "egress"
        assert "/dev/net/tun" in report["reason"]


@needs_world
def test_unprivileged_with_a_usable_tun_device_is_the_same(world):
    if not world["tun_opened"]:
        pytest.skip("cannot create a tun device node in the throwaway mount namespace")
    results = world["unprivileged_open_tun"]["results"]
    assert results["allowed"]["answer"] == "upstream 10.203.0.2:8080"
    assert results["ipv6_allowed"]["answer"] == "upstream fd00:203::2:8080"
    for target in ("other_port", "loopback", "world", "metadata", "private", "ipv6", "ipv6_other_port"):
        assert results[target]["stage"] == "connect" and results[target]["s"] < SANITY_BOUND_S
    assert {results[kind]["error"] for kind in ("raw", "netlink", "packet")} == {"EAFNOSUPPORT"}
