"""Which isolation layers this host provides, found by trying them.

Owns: the host-level checks that decide which layers are worth trying, and
the probe that settles the rest: a real worker, started through the same
code path as every other, with every layer optional, whose hello reports
what actually took effect. The answer is cached per process and identity.

Must never: claim a layer works because a check passed; only a worker that
applied it says "on".
"""

from __future__ import annotations

import os
from dataclasses import replace
from typing import Any

from sandbox import egress
from sandbox.cgroups import CgroupParents
from sandbox.errors import ConfinementUnavailable
from sandbox.policies.model import LAYERS, Policy
from sandbox.profile import HostSupport, TenantProfile, build_profile
from sandbox.runtime import linux
from sandbox.seccomp import SeccompUnavailable, build_filter
from sandbox.worker import WorkerProcess
from sandbox.zygote import Zygote

_probed: dict[tuple[int, bool], dict[str, str]] = {}
_probed_egress: dict[tuple[int, bool], str] = {}
# Nothing is ever sent: the probe worker only has to be set up with a rule.
_EGRESS_PROBE = "192.0.2.1:9"  # TEST-NET-1 (RFC 5737), discard port


class _Discard:
    def worker_released(self, worker: WorkerProcess, *, retire: bool) -> None:
        worker.kill()

    def worker_lost(self, worker: WorkerProcess) -> None:
        pass


async def probe(
    zygote: Zygote, cgroups: CgroupParents | None, cgroup_error: str | None, *, egress: bool = False
) -> HostSupport:
    """What this host provides; egress is tried (one more worker start) only when asked for."""
    root = os.geteuid() == 0
    namespaces = zygote.namespaces
    key = (os.geteuid(), cgroups is not None)
    if key not in _probed:
        _probed[key] = await _try_layers(zygote, root, namespaces, cgroups, cgroup_error)
    host = HostSupport(_probed[key], root, bool(namespaces.get("pid_namespaces")), cgroups)
    if not egress:
        return replace(host, egress="off: not probed (no policy has egress entries)")
    if key not in _probed_egress:
        _probed_egress[key] = await _try_egress(zygote, host)
    return replace(host, egress=_probed_egress[key])


async def _try_egress(zygote: Zygote, host: HostSupport) -> str:
    """Settle egress by starting a worker with a rule: "on: ..." only if it came up."""
    state = egress.host_support()
    if not state.startswith("on"):
        return state
    policy = Policy(required_layers=[], egress=[_EGRESS_PROBE])
    try:
        await _start_and_stop(zygote, build_profile("(probe)", policy, replace(host, egress=state)))
    except ConfinementUnavailable as exc:
        return f"off: {exc.reason}"
    return state


async def _start_and_stop(zygote: Zygote, profile: TenantProfile) -> dict[str, str]:
    """The layers a real worker of ``profile`` reported applied."""
    worker = WorkerProcess(0, profile, _Discard())
    try:
        await worker.start(zygote)
        return worker.layers
    finally:
        worker.kill()


async def _try_layers(
    zygote: Zygote, root: bool, namespaces: dict[str, Any], cgroups: CgroupParents | None, cgroup_error: str | None
) -> dict[str, str]:
    unavailable: dict[str, str] = {}
    if not (root or namespaces.get("userns")):
        unavailable["identity"] = f"off: not root, and no user namespace ({namespaces.get('namespace_error')})"
    if not namespaces.get("pid_namespaces"):
        unavailable["pidns"] = f"off: {namespaces.get('namespace_error')}"
    if namespaces.get("netns_error"):
        unavailable["netns"] = f"off: {namespaces['netns_error']}"
    if cgroups is None:
        unavailable["cgroup"] = f"off: {cgroup_error}"
    try:
        build_filter(allow_processes=False, allow_network=False, pid_namespace=True)
    except SeccompUnavailable as exc:
        unavailable["seccomp"] = f"off: {exc}"
    if linux.landlock_abi() < 1:
        unavailable["landlock"] = "off: this kernel has no landlock"

    provisional = {layer: unavailable.get(layer, "on") for layer in LAYERS}
    host = HostSupport(provisional, root, bool(namespaces.get("pid_namespaces")), cgroups)
    applied = await _start_and_stop(zygote, build_profile("(probe)", Policy(required_layers=[]), host))
    return {layer: unavailable.get(layer) or applied.get(layer, "off: not reported") for layer in LAYERS}
