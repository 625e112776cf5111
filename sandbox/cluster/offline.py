"""A Ray cluster on this one machine that cannot reach the network: for tests and benchmarks.

Owns: the command prefix that runs a program in a network namespace of its
own with only loopback up, the check that a process is in one, and a local
``ray.cluster_utils.Cluster`` whose every process is bound to 127.0.0.1.

Must never: start Ray anywhere but in such a namespace. Ray probes the cloud
metadata address (169.254.169.254) and its usage-stats endpoint when it
starts, even with the dashboard and usage stats off; in a namespace with
only loopback those probes fail at once (ENETUNREACH) and nothing leaves
the machine. A namespace is per thread in Linux: ``unshare(CLONE_NEWNET)``
in a threaded process moves only the calling thread, so the whole program
is started inside one (``unshare --net``), never moved there.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import socket
import struct
import sys
import tempfile
from typing import Any

MiB = 1024 * 1024
_STORE_BYTES = 80 * MiB  # per node; Ray's minimum is about 75 MiB
_temp_dirs: dict[int, str] = {}  # a started cluster's Ray files, removed when it is stopped
_SIOCSIFFLAGS = 0x8914
_IFF_UP, _IFF_LOOPBACK, _IFF_RUNNING = 0x1, 0x8, 0x40


def only_loopback() -> bool:
    """Whether this process's network namespace has no interface but ``lo``."""
    return [name for _, name in socket.if_nameindex()] == ["lo"]


def loopback_only(command: list[str]) -> list[str]:
    """``command`` run in a new network namespace where only loopback is up.

    Needs ``unshare`` (util-linux); as a user other than root,
    ``--map-root-user`` lends the rights to create the namespace. This
    module, run as a program, brings loopback up and then becomes
    ``command``.
    """
    unshare = ["unshare", "--net"] if os.geteuid() == 0 else ["unshare", "--net", "--map-root-user"]
    return [*unshare, sys.executable, "-m", "sandbox.cluster.offline", *command]


def bring_loopback_up() -> None:
    """``ip link set lo up``, without needing iproute2: one SIOCSIFFLAGS ioctl."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        request = struct.pack("16sH", b"lo", _IFF_UP | _IFF_LOOPBACK | _IFF_RUNNING)
        fcntl.ioctl(probe.fileno(), _SIOCSIFFLAGS, request)


def node_args(name: str, cpus: int = 1) -> dict[str, Any]:
    """One simulated node: ``cpus`` CPUs and a resource ``node_<name>`` naming it, bound to loopback."""
    return {
        "num_cpus": cpus,
        "resources": {f"node_{name}": 1},
        "node_ip_address": "127.0.0.1",
        "object_store_memory": _STORE_BYTES,
    }


def start_local_cluster(nodes: int = 2, cpus: int = 1) -> Any:
    """Start a head node plus ``nodes - 1`` nodes here and connect this process to them.

    Stop it with :func:`stop_local_cluster`. A removed node is noticed in
    about two seconds, not the default half minute.
    """
    if not only_loopback():
        raise RuntimeError(
            "refusing to start Ray outside a network namespace with only loopback: "
            "run this program under sandbox.cluster.offline.loopback_only([...])"
        )
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    import ray
    import ray._private.services as services
    from ray.cluster_utils import Cluster

    services.get_node_ip_address = lambda *args, **kwargs: "127.0.0.1"  # the driver's own address
    temp_dir = tempfile.mkdtemp(prefix="ray-")
    head = {
        **node_args("head", cpus),
        "include_dashboard": False,
        "temp_dir": temp_dir,
        "_system_config": {"health_check_period_ms": 500, "health_check_failure_threshold": 4},
    }
    cluster = Cluster(initialize_head=True, head_node_args=head)
    for index in range(1, nodes):
        cluster.add_node(**node_args(chr(ord("a") + index), cpus))
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, _node_ip_address="127.0.0.1")
    _temp_dirs[id(cluster)] = temp_dir
    return cluster


def stop_local_cluster(cluster: Any) -> None:
    """Disconnect, stop every node of ``cluster`` and remove its files."""
    import ray

    ray.shutdown()
    cluster.shutdown()
    shutil.rmtree(_temp_dirs.pop(id(cluster), ""), ignore_errors=True)


if __name__ == "__main__":
    if not only_loopback():
        raise SystemExit("sandbox.cluster.offline: not in a network namespace of its own; use loopback_only()")
    bring_loopback_up()
    os.execvp(sys.argv[1], sys.argv[1:])
