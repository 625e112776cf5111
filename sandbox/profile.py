"""Translate a tenant's Policy into how its workers are started and limited.

Owns: the mapping from policy fields to rlimits, tmpfs sizes, cgroup
limits, the seccomp profile, the environment, the layers each worker must
apply (failing closed when the host lacks one), and the host-side limits
the supervisor enforces on that tenant's workers.

Must never: put a secret into the zygote config (``TenantProfile.template``):
every worker is forked from the zygote's memory. The environment, which may
carry secrets the operator chose to pass, travels separately (``env``).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any

from sandbox.cgroups import CgroupParents
from sandbox.egress import rules_of
from sandbox.errors import ConfinementUnavailable
from sandbox.policies.egress import EgressRule
from sandbox.policies.model import EGRESS_LAYERS, LAYERS, Policy
from sandbox.runtime import wire
from sandbox.seccomp import build_filter
from sandbox.zygote import NATIVE_THREAD_VARIABLES, USERNS_INSIDE_ID

MiB = 1024 * 1024
BASE_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": "/work", "TMPDIR": "/tmp", "LANG": "C.UTF-8"}
_ETC_FILES = ["ld.so.cache", "localtime", "nsswitch.conf", "hosts", "mime.types"]
_NETWORK_ETC_FILES = ["resolv.conf", "ssl", "ca-certificates", "gai.conf", "services", "protocols"]
# With egress: TLS trust and service names, but no resolv.conf: the worker resolves nothing itself.
_EGRESS_ETC_FILES = ["ssl", "ca-certificates", "gai.conf", "services", "protocols"]
# Root mode gives each worker its own uid and gid from this range.
UID_BASE = 1_600_000_000
UID_SPAN = 1_000_000
# As root, every worker of a tenant with mounts also holds this group: the
# one name an operator grants mounted files to (README, "Host mounts").
MOUNT_GID = UID_BASE - 1
_STACK_BYTES = 8 * MiB
_FRAME_HEADROOM = 1 * MiB  # names, labels and reasons on top of the values themselves
MAX_ERROR_TEXT_BYTES = 64 * 1024


@dataclass(frozen=True)
class HostSupport:
    """What this host can provide: ``layers`` maps each layer to "on" or "off: why"."""

    layers: dict[str, str]
    root: bool
    pid_namespace: bool
    cgroups: CgroupParents | None = field(default=None, compare=False)
    egress: str = "off: not probed"  # "on: <mechanism>" or "off: why" (see sandbox.egress)

    @property
    def supported(self) -> frozenset[str]:
        return frozenset(name for name, state in self.layers.items() if state == "on")


@dataclass(frozen=True)
class TenantProfile:
    name: str
    policy: Policy
    required: frozenset[str]
    template: dict[str, Any]
    env: dict[str, str]
    cgroups: CgroupParents | None = field(default=None, compare=False)
    egress: tuple[EgressRule, ...] = ()

    @property
    def max_frame_bytes(self) -> int:
        return max_frame_bytes(self.policy)

    def worker_config(self, worker_id: int, *, session: bool = False) -> dict[str, Any]:
        """The zygote config of one worker: the template plus its own ids.

        A session's worker keeps its namespace between runs, and its
        RLIMIT_CPU covers a session's whole life rather than two runs: each
        run's own budget is still the watchdog's to enforce, to the tick.
        """
        config = dict(self.template)
        if session:
            cpu = math.ceil(self.policy.cpu_time_s)
            cpu_hard = math.ceil(self.policy.session_max_s) + 2 * cpu + 1
            config["rlimits"] = {**config["rlimits"], "cpu": (cpu_hard, cpu_hard)}
            config["worker"] = {**config["worker"], "session": True, "single_run": False}
        if config.pop("dedicated_uid"):
            config["uid"] = config["gid"] = UID_BASE + worker_id % UID_SPAN
        if self.cgroups is not None and "cgroup" in config["layers"]:
            policy = self.policy
            tasks = policy.max_threads + (policy.max_processes if policy.allow_processes else 0) + 1
            memory = policy.memory_mb * MiB + scratch_bytes(policy)
            config["cgroup"] = {"hierarchies": self.cgroups.worker_limits(max_tasks=tasks, memory_bytes=memory)}
        return config


def build_profile(name: str, policy: Policy, host: HostSupport) -> TenantProfile:
    """Fail closed: raise ConfinementUnavailable if a required layer is missing."""
    applicable = set(host.supported) - set(policy.skip_layers)
    if policy.network:
        applicable.discard("netns")  # network means staying in the host's namespace
    if policy.required_layers == "auto":
        required = frozenset(applicable)
    else:
        required = frozenset(policy.required_layers)
        if policy.network and "netns" in required:
            raise ConfinementUnavailable(
                f"tenant {name!r} requires layer 'netns' but its policy allows network",
                layer="netns",
                reason="the policy allows network",
            )
    egress = tuple(rules_of(policy.egress))
    if egress:
        _check_egress(name, host)
        required |= frozenset(EGRESS_LAYERS)
    if policy.mounts:
        if "mountns" not in applicable:
            reason = host.layers.get("mountns", "off: skipped by skip_layers")
            raise ConfinementUnavailable(
                f"tenant {name!r} has mounts, which need layer 'mountns' ({reason})", layer="mountns", reason=reason
            )
        required |= {"mountns"}  # a worker without its own view would run without its mounts
    missing = sorted(required - host.supported, key=LAYERS.index)
    if missing:
        details = "; ".join(f"{layer}: {host.layers.get(layer, 'off: unknown layer')}" for layer in missing)
        raise ConfinementUnavailable(
            f"tenant {name!r} requires isolation layers this host cannot provide ({details})",
            layer=missing[0],
            reason=host.layers.get(missing[0], "unknown"),
        )

    seccomp = None
    if "seccomp" in applicable:
        seccomp = build_filter(
            allow_processes=policy.allow_processes,
            allow_network=policy.network,
            pid_namespace=host.pid_namespace,
            egress=tuple(sorted({rule.protocol for rule in egress})),
        )
    template = {
        "layers": {layer: layer in required for layer in sorted(applicable, key=LAYERS.index)},
        "dedicated_uid": host.root,
        "userns_id": USERNS_INSIDE_ID,
        "network": policy.network,
        "readonly": policy.filesystem == "readonly",
        "mounts": [(m.source, m.target, m.writable) for m in policy.mounts],
        "groups": [MOUNT_GID] if policy.mounts and host.root else [],
        "etc_files": _ETC_FILES + (_NETWORK_ETC_FILES if policy.network else _EGRESS_ETC_FILES if egress else []),
        "scratch_bytes": scratch_bytes(policy),
        "rlimits": _rlimits(policy, host.root),
        "seccomp_bpf": seccomp,
        "worker": {
            "tenant": name,
            "allowed_modules": list(policy.allowed_modules),
            "denied_modules": list(policy.denied_modules),
            "removed_builtins": list(policy.removed_builtins),
            "max_result_bytes": policy.max_result_bytes,
            "max_reply_bytes": policy.max_reply_bytes,
            "max_frame_bytes": max_frame_bytes(policy),
            "max_out_files": policy.max_out_files,
            "max_out_files_bytes": policy.max_out_files_bytes,
            "max_error_text_bytes": MAX_ERROR_TEXT_BYTES // 2,
            "allow_processes": policy.allow_processes,
            "network": policy.network,
            "egress": bool(egress),
            "session": False,
            "single_run": policy.fresh_process_per_run,
        },
    }
    env = {
        **BASE_ENV,
        **native_thread_env(policy.max_threads),
        **{key: os.environ[key] for key in policy.env if key in os.environ},
    }
    return TenantProfile(name, policy, required, template, env, host.cgroups, egress)


def _check_egress(name: str, host: HostSupport) -> None:
    if not host.egress.startswith("on"):
        raise ConfinementUnavailable(
            f"tenant {name!r} has egress rules, but this host cannot enforce them ({host.egress})",
            layer="egress",
            reason=host.egress,
        )


def native_thread_env(max_threads: int) -> dict[str, str]:
    """Thread counts for the usual native pools, fitted to the thread budget.

    Why: OpenBLAS, OpenMP, MKL and numexpr size their pools from the CPU
    count when they load. Under a budget of ``max_threads`` their
    ``pthread_create`` fails, and OpenBLAS then spins until the CPU limit
    kills the run with an error that points nowhere near the cause. A pool of
    N threads is the calling thread plus N - 1 workers, so N may be the whole
    budget (and never more than the CPUs, where more threads buy nothing).
    """
    threads = str(max(1, min(max_threads, os.cpu_count() or 1)))
    return dict.fromkeys(NATIVE_THREAD_VARIABLES, threads)


def max_frame_bytes(policy: Policy) -> int:
    """The largest reply a worker may send: all outputs, all files, and each file's path and reason."""
    per_file = 2 * (wire.MAX_PATH_BYTES + wire.MAX_LABEL_BYTES)
    return policy.max_reply_bytes + policy.max_out_files_bytes + policy.max_out_files * per_file + _FRAME_HEADROOM


def scratch_bytes(policy: Policy) -> int:
    """Size of the one tmpfs behind a worker's /work, /tmp and /dev/shm."""
    return (policy.scratch_mb + 2 * policy.tmp_mb) * MiB


def _rlimits(policy: Policy, root: bool) -> dict[str, tuple[int, int]]:
    # RLIMIT_CPU counts a process's whole life, and no rlimit can change
    # after confinement (seccomp). A fresh process per run gets exactly the
    # run's budget. A reused worker gets twice the budget plus a second, and
    # asks to be replaced before the limit could cut a run short; each run's
    # own budget is enforced by the supervisor's watchdog, to the tick.
    cpu = math.ceil(policy.cpu_time_s)
    cpu_hard = cpu if policy.fresh_process_per_run else 2 * cpu + 1
    memory = policy.memory_mb * MiB
    limits = {
        "cpu": (cpu_hard, cpu_hard),
        "data": (memory, memory),
        "nofile": (policy.max_open_files, policy.max_open_files),
        "fsize": (policy.max_file_size_mb * MiB, policy.max_file_size_mb * MiB),
        "core": (0, 0),
        "stack": (_STACK_BYTES, _STACK_BYTES),
    }
    if root:
        # Only meaningful with a uid of the worker's own: it counts every
        # task of the uid. Unprivileged workers share the supervisor's uid.
        tasks = policy.max_threads + (policy.max_processes if policy.allow_processes else 0)
        limits["nproc"] = (tasks, tasks)
    return limits
