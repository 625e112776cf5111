"""The unprivileged path: the supervisor as uid 65534, in a throwaway PID namespace.

As documented for hosts without root, the Sandbox starts with every layer
but ``cgroup``, benign runs work, and a representative set of the shared
samples and of our own attacks still hold. The harness drops to uid 65534
itself (see ``tests.hostile.client``); these tests need root to set that up.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from sandbox.policies import Policy
from sandbox.policies.model import LAYERS
from sandbox.zygote import USERNS_INSIDE_ID
from tests.conftest import HOSTILE
from tests.hostile import attacks, samples
from tests.hostile.attacks import escaped
from tests.hostile.checks import Targets, attack, lost_workers, output_value
from tests.hostile.client import UNPRIVILEGED_UID, HarnessProcess, unprivileged_unavailable
from tests.hostile.contract import check_sample

POLICY = {"wall_time_s": 1.5, "cpu_time_s": 1, "max_output_bytes": 256 * 1024}
DATA_POLICY = {**POLICY, "wall_time_s": 10, "cpu_time_s": 5, "allowed_modules": ["numpy.*", "pandas.*", "asyncio"]}
PROCS_POLICY = {**POLICY, "allow_processes": True, "max_processes": 16}
TENANTS = {"default": POLICY, "other": POLICY, "data": DATA_POLICY, "procs": PROCS_POLICY}
LIMITS = Policy(**POLICY)
MiB = 1024 * 1024
MEMFD_FILES = 30  # 30 x 16 MiB = 480 MiB of memfd memory, far over memory_mb
REPRESENTATIVE_SAMPLES = [
    "fork_bomb",
    "orphan_daemon",
    "subprocess_via_loop",
    "kill_parent",
    "prlimit_parent",
    "read_parent_env",
    "read_shadow",
    "network_connect",
    "write_outside",
    "poisoned_result",
    "poison_shared_module",
    "forge_reply",
    "segfault",
    "memory_bomb",
    "disk_fill",
    "c_level_hog",
]
SAMPLES = {sample.name: sample for sample in samples.load(HOSTILE)}
UNAVAILABLE = unprivileged_unavailable()

pytestmark = pytest.mark.skipif(UNAVAILABLE is not None, reason=f"unprivileged harness unavailable: {UNAVAILABLE}")


@pytest.fixture(scope="module")
def harness() -> Iterator[HarnessProcess]:
    process = HarnessProcess(TENANTS, unprivileged=True)
    yield process
    process.close()


def test_the_sandbox_starts_with_every_layer_but_cgroup(harness: HarnessProcess) -> None:
    info = harness.info()
    assert info["uid"] == UNPRIVILEGED_UID
    layers = info["layers"]
    assert set(layers) == set(LAYERS)
    assert layers["cgroup"].startswith("off"), layers["cgroup"]
    assert {name: state for name, state in layers.items() if name != "cgroup"} == {
        name: "on" for name in LAYERS if name != "cgroup"
    }


def test_benign_runs_work(harness: HarnessProcess, targets: Targets) -> None:
    code = "import json\nawait asyncio.sleep(0)\nprint('hello')\ntotal = sum(rows)\ntext = json.dumps(rows)\n"
    report = attack(harness, targets, code, extra_inputs={"rows": [1, 2, 3]})
    assert output_value(report, "total") == 6
    assert output_value(report, "text") == "[1, 2, 3]"
    assert report["stdout"] == "hello\n"


def test_numpy_and_pandas_values_come_back_real_from_an_unprivileged_worker(
    harness: HarnessProcess, targets: Targets
) -> None:
    # The worker loads pyarrow itself, under landlock and seccomp, to send the frame.
    code = "import numpy as np, pandas as pd\narray = np.arange(3)\nframe = pd.DataFrame({'a': [1], 's': ['x']})"
    report = attack(harness, targets, code, tenant="data")
    assert report["outcome"] == "ok", report["message"]
    described = {name: (value["type"], value["opaque"]) for name, value in report["outputs"].items()}
    assert described == {"array": ("ndarray", False), "frame": ("DataFrame", False)}


@pytest.mark.parametrize("name", REPRESENTATIVE_SAMPLES)
def test_representative_samples_hold(harness: HarnessProcess, name: str) -> None:
    if name not in SAMPLES:
        pytest.skip(f"sample {name} is not in {HOSTILE}")
    check_sample(harness, LIMITS, SAMPLES[name])


@pytest.mark.parametrize("route", ["subclass_walk", "gc_objects"])
def test_escapes_reach_an_unprivileged_worker_in_its_own_namespaces(
    harness: HarnessProcess, targets: Targets, route: str
) -> None:
    report = attack(harness, targets, escaped(route, "os = _mod('os')\npid = os.getpid()\nuid = os.getuid()\n"))
    assert output_value(report, "pid") == 2
    assert output_value(report, "uid") == USERNS_INSIDE_ID  # the user namespace's id, no capabilities


@pytest.mark.parametrize(
    "route, body",
    [
        ("traceback_frames", attacks.FORK_LOOP),
        ("gc_objects", attacks.POSIXSUBPROCESS),
    ],
    ids=["os.fork-bomb", "_posixsubprocess"],
)
def test_process_creation_is_refused(harness: HarnessProcess, targets: Targets, route: str, body: str) -> None:
    report = attack(harness, targets, escaped(route, body))
    assert report["outcome"] == "CodeError" and report["message"].startswith("PermissionError"), report["message"]


@pytest.mark.parametrize(
    "route, body",
    [
        ("asyncio_reexport", attacks.KILL_INIT),
        ("traceback_frames", attacks.PIDFD_KILL_INIT),
    ],
    ids=["kill", "pidfd_send_signal"],
)
def test_the_worker_cannot_kill_its_init_of_the_same_uid(
    harness: HarnessProcess, targets: Targets, route: str, body: str
) -> None:
    report = attack(harness, targets, escaped(route, body))
    assert report["outcome"] in {"ok", "CodeError"}, report["message"][:300]
    assert not lost_workers(report), "the worker's namespace died with its init"


def test_root_new_namespaces_mounts_and_chroot_stay_out_of_reach(harness: HarnessProcess, targets: Targets) -> None:
    report = attack(harness, targets, escaped("allowed_module_globals", attacks.REGAIN_PRIVILEGES))
    assert output_value(report, "succeeded") == []


def test_signals_and_prlimit_reach_nothing_outside_the_worker(harness: HarnessProcess, targets: Targets) -> None:
    signals = attack(harness, targets, escaped("subclass_walk", attacks.SIGNAL_SCAN))
    assert set(output_value(signals, "reached")) <= {1}
    limits = attack(harness, targets, escaped("gc_objects", attacks.PRLIMIT_SCAN))
    assert output_value(limits, "changed") == []


def test_no_environment_holds_the_supervisors_secret(harness: HarnessProcess, targets: Targets) -> None:
    report = attack(harness, targets, escaped("random_os", attacks.READ_ENVIRONMENTS))
    assert "/proc/1/environ" in report["stdout"]


def test_nothing_outside_the_scratch_space_can_be_written(harness: HarnessProcess, targets: Targets) -> None:
    report = attack(harness, targets, escaped("generator_frame", attacks.WRITE_EVERYWHERE))
    assert output_value(report, "written") == []


def test_no_socket_family_but_unix_can_be_created(harness: HarnessProcess, targets: Targets) -> None:
    report = attack(harness, targets, escaped("allowed_module_globals", attacks.SOCKET_FAMILIES))
    assert output_value(report, "created") == []


def test_filling_dev_shm_is_bounded_by_the_policy(harness: HarnessProcess, targets: Targets) -> None:
    report = attack(
        harness,
        targets,
        escaped("random_os", attacks.FILL),
        extra_inputs={"directory": "/dev/shm"},
        inspect_scratch=True,
    )
    sizes = output_value(report, "sizes")
    assert max(sizes) <= LIMITS.max_file_size_mb * MiB
    assert sum(sizes) <= (LIMITS.scratch_mb + 2 * LIMITS.tmp_mb) * MiB


def test_memory_in_memfd_files_is_refused_without_a_memory_cgroup(harness: HarnessProcess, targets: Targets) -> None:
    # Without a memory cgroup nothing else would count memfd pages written but never mapped.
    report = attack(harness, targets, escaped("random_os", attacks.MEMFD_HOG), extra_inputs={"files": MEMFD_FILES})
    assert report["outcome"] == "CodeError" and report["message"].startswith("PermissionError"), report["message"]


@pytest.mark.parametrize("spin", [True, False], ids=["spinning", "asleep"])
def test_a_process_left_behind_goes_with_its_worker_without_a_cgroup(
    harness: HarnessProcess, targets: Targets, spin: bool
) -> None:
    """Without a pids cgroup, the idle watch finds the leftover in the worker's PID namespace."""
    code = escaped("subclass_walk", attacks.LEFTOVER_AFTER_UNDOING_CLEANUP)
    report = attack(harness, targets, code, tenant="procs", extra_inputs={"spin": spin})
    assert output_value(report, "armed") is True
    assert report["worker_pid"] not in report["workers_after"], "the worker with a process left behind was kept"


def test_a_thread_bomb_is_bounded_without_a_pids_cgroup(harness: HarnessProcess, targets: Targets) -> None:
    report = attack(harness, targets, escaped("traceback_frames", attacks.THREAD_BOMB))
    assert output_value(report, "started") <= 2 * LIMITS.max_threads  # thread stacks count against RLIMIT_DATA
    assert lost_workers(report)


def test_a_segfault_is_reported_and_the_worker_replaced(harness: HarnessProcess, targets: Targets) -> None:
    report = attack(harness, targets, escaped("gc_objects", attacks.NULL_DEREFERENCE))
    assert report["outcome"] == "WorkerCrashed" and report["attributes"]["signal"] == 11
