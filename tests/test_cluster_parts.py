"""The parts of sandbox.cluster that need no Ray: the reply encoding and the routing rule.

The cluster itself is tested on a real Ray cluster in tests/cluster/.
"""

from __future__ import annotations

import os
import pickle
import socket
import subprocess
import sys
from dataclasses import dataclass

import pytest

from sandbox import CodeError, Opaque, Result, RunStats, TimeLimitExceeded, run_sync
from sandbox.cluster import protocol, routing


def a_result() -> Result:
    stats = RunStats(wall_s=0.5, cpu_s=0.25, peak_memory_bytes=1 << 20, worker_pid=42, tenant="t", node="here")
    outputs = {"n": 3, "rows": [{"a": (1, 2.5)}, {"b"}], "blob": Opaque(b"\x80\x05junk.", "mod.Thing", "not inert")}
    return Result(outputs, "out\n", "err\n", {"f": "a function"}, stats)


def test_a_result_crosses_with_inert_values_decoded_and_opaque_kept_as_bytes() -> None:
    decoded = protocol.decode_reply(protocol.encode_result(a_result(), node="node-7"))
    assert isinstance(decoded, Result)
    assert decoded.outputs["n"] == 3 and decoded.outputs["rows"] == [{"a": (1, 2.5)}, {"b"}]
    blob = decoded.outputs["blob"]
    assert isinstance(blob, Opaque) and blob.data == b"\x80\x05junk." and blob.type_name == "mod.Thing"
    assert (decoded.stdout, decoded.stderr, decoded.skipped) == ("out\n", "err\n", {"f": "a function"})
    assert decoded.stats.node == "node-7" and decoded.stats.worker_pid == 42


def test_errors_cross_with_their_type_and_details() -> None:
    error = TimeLimitExceeded("too slow", kind="cpu", limit_s=2.0, stdout="so far")
    decoded = protocol.decode_reply(protocol.encode_error(error))
    assert isinstance(decoded, TimeLimitExceeded)
    assert (decoded.kind, decoded.limit_s, decoded.stdout, str(decoded)) == ("cpu", 2.0, "so far", "too slow")
    code_error = protocol.decode_reply(protocol.encode_error(CodeError("KeyError", "'k'", "Traceback: line 2")))
    assert isinstance(code_error, CodeError) and code_error.traceback == "Traceback: line 2"


class Foreign:
    """What a compromised node could send: a pickle that calls a host function when loaded."""

    def __reduce__(self) -> tuple:
        return (os.getpid, ())


def test_a_reply_naming_a_foreign_class_is_never_unpickled() -> None:
    evil = pickle.dumps(Foreign(), protocol=5)
    header = {"kind": "result", "stdout": "", "stderr": "", "skipped": {}, "stats": a_result().stats.as_dict()}
    header["outputs"] = [["x", "value", "", "", len(evil)]]
    decoded = protocol.decode_reply(protocol._pack(header, [evil]))
    assert isinstance(decoded, Result) and isinstance(decoded.outputs["x"], Opaque)  # not the pid
    forged = {"kind": "error", "type": "os.system", "attributes": {"message": "m"}}
    assert type(protocol.decode_reply(protocol._pack(forged))).__name__ == "SandboxError"


@pytest.mark.parametrize(
    "payload", [b"", b"\x05\x00\x00\x00{}", b"\x02\x00\x00\x00[]", protocol._pack({"kind": "result", "outputs": 1})]
)
def test_a_malformed_reply_is_a_protocol_error(payload: bytes) -> None:
    with pytest.raises(protocol.ProtocolError):
        protocol.decode_reply(payload)


@dataclass
class FakeNode:
    node_id: str
    capacity: int = 2
    in_flight: int = 0


def test_a_tenant_stays_on_its_home_node_while_it_has_room() -> None:
    nodes = [FakeNode(f"n{i}") for i in range(5)]
    home = routing.choose("tenant-a", nodes)
    assert home is not None
    assert all(routing.choose("tenant-a", list(reversed(nodes))) is home for _ in range(3))
    # Removing another node does not move the tenant.
    assert routing.choose("tenant-a", [n for n in nodes if n is home or n.node_id != "n0"]) is home
    homes = {routing.choose(f"tenant-{i}", nodes).node_id for i in range(50)}  # type: ignore[union-attr]
    assert len(homes) >= 4  # tenants spread over the nodes


def test_a_full_home_spills_to_the_least_loaded_node() -> None:
    nodes = [FakeNode(f"n{i}", capacity=4) for i in range(4)]
    home = routing.choose("t", nodes)
    assert home is not None
    home.in_flight = 4
    for node, load in zip([n for n in nodes if n is not home], [3, 1, 2], strict=True):
        node.in_flight = load
    spilled = routing.choose("t", nodes)
    assert spilled is not None and spilled.in_flight == 1
    for node in nodes:
        node.in_flight = node.capacity
    assert routing.choose("t", nodes) is None


def test_neither_import_sandbox_nor_the_node_supervisor_imports_ray() -> None:
    code = "import sys, sandbox, sandbox.cluster, sandbox.cluster.node; sandbox.Sandbox; print('ray' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "False\n"


def test_a_local_run_names_its_host_as_its_node() -> None:
    assert run_sync("x = 1").stats.node == socket.gethostname()
