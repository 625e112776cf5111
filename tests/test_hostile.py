"""Our own hostile code against a supervisor living in a throwaway PID namespace.

The supervisor runs as the test's own user: as root (the usual case), with a
dedicated uid per worker and cgroups; otherwise through a user namespace.

Every attack first climbs out of the Python-level guard by one of several
routes (``tests.hostile.attacks.ESCAPES``), then goes for the host: process
creation, signals and rlimits aimed outside the worker, the supervisor's
environment, the network, files outside the scratch space, memory-backed
and disk space, threads, file descriptors, crashes, stops and C-level CPU
hogs. After each run the host must be intact (``assert_host_intact``): the
supervisor alive, its rlimits and its event loop unaffected, no process
left behind, no file, connection or secret reached, the next run fine.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from sandbox.idlewatch import IDLE_CPU_ALLOWANCE_S
from sandbox.policies import Policy
from sandbox.profile import UID_BASE
from sandbox.zygote import USERNS_INSIDE_ID
from tests.conftest import IS_ROOT
from tests.hostile import attacks
from tests.hostile.attacks import escaped
from tests.hostile.checks import TIME_MARGIN_S, Targets, attack, lost_workers, output_value, report_text
from tests.hostile.client import HarnessProcess
from tests.hostile.harness import SECRET_VARIABLE

POLICY = {"wall_time_s": 1.5, "cpu_time_s": 1, "max_output_bytes": 256 * 1024}
TENANTS = {
    "default": POLICY,
    "procs": {**POLICY, "allow_processes": True, "max_processes": 16},  # a tenant that may fork
    "net": {**POLICY, "network": True},  # controls: prove the listeners see what reaches them
    "envpass": {**POLICY, "env": [SECRET_VARIABLE]},  # control: proves the secret scan finds a leak
}
LIMITS = Policy(**POLICY)
MiB = 1024 * 1024
ROUTES = sorted(attacks.ESCAPES)
MEMFD_FILES = 30  # 30 x 16 MiB = 480 MiB of memfd memory, far over memory_mb


@pytest.fixture(scope="module")
def harness() -> Iterator[HarnessProcess]:
    process = HarnessProcess(TENANTS)
    yield process
    process.close()


def assert_refused(report: dict) -> None:
    """The attempt raised PermissionError in the code: the kernel refused it."""
    assert report["outcome"] == "CodeError", f"{report['outcome']}: {report['message'][:300]}"
    assert report["message"].startswith("PermissionError"), report["message"][:300]


def assert_ends_near_limit(report: dict, outcomes: set[str]) -> None:
    assert report["outcome"] in outcomes, f"{report['outcome']}: {report['message'][:300]}"
    limit = LIMITS.wall_time_s + TIME_MARGIN_S
    assert report["elapsed_s"] <= limit, f"ran {report['elapsed_s']:.2f} s, limit + margin {limit} s"


# --- the escapes themselves ---------------------------------------------------------


@pytest.mark.parametrize("route", ROUTES)
def test_every_escape_route_reaches_the_real_os_of_a_confined_worker(
    harness: HarnessProcess, targets: Targets, route: str
) -> None:
    """The guard is beaten on purpose: what follows tests the OS layers, not the guard."""
    code = escaped(route, "os = _mod('os')\npid = os.getpid()\nuid = os.getuid()\nppid = os.getppid()\n")
    report = attack(harness, targets, code)
    assert report["skipped"]["os"] == "module"
    assert output_value(report, "pid") == 2  # pid 2 of its own PID namespace
    assert output_value(report, "ppid") == 0  # its parent, the zygote, is outside that namespace
    uid = output_value(report, "uid")
    assert uid >= UID_BASE if IS_ROOT else uid == USERNS_INSIDE_ID  # a dedicated uid, or a user namespace's


# --- process creation ------------------------------------------------------------------


@pytest.mark.parametrize(
    "route, body",
    [
        ("traceback_frames", attacks.FORK_LOOP),
        ("random_os", attacks.POSIX_SPAWN),
        ("gc_objects", attacks.POSIXSUBPROCESS),
        ("asyncio_reexport", attacks.SUBPROCESS_MODULE),
        ("generator_frame", attacks.DOUBLE_FORK_DAEMON),
    ],
    ids=["os.fork-bomb", "posix_spawn", "_posixsubprocess", "subprocess", "double-fork-daemon"],
)
def test_process_creation_is_refused(harness: HarnessProcess, targets: Targets, route: str, body: str) -> None:
    assert_refused(attack(harness, targets, escaped(route, body)))


@pytest.mark.parametrize(
    "code", [attacks.SUBPROCESS_EXEC_VIA_LOOP, attacks.SHELL_DAEMON_VIA_LOOP], ids=["exec", "shell-daemon"]
)
def test_the_event_loop_cannot_start_processes_either(harness: HarnessProcess, targets: Targets, code: str) -> None:
    assert_refused(attack(harness, targets, code))


def test_os_system_cannot_start_a_shell(harness: HarnessProcess, targets: Targets) -> None:
    report = attack(harness, targets, escaped("allowed_module_globals", attacks.OS_SYSTEM))
    assert output_value(report, "status") != 0


def test_raw_fork_vfork_and_clone_syscalls_are_refused(harness: HarnessProcess, targets: Targets) -> None:
    report = attack(harness, targets, escaped("subclass_walk", attacks.RAW_CLONE))
    assert output_value(report, "results") == [[-1, 1]] * 3  # -1 with EPERM, three times


@pytest.mark.skipif(
    not IS_ROOT,
    reason="unprivileged, only the wall-clock limit bounds a fork bomb where "
    "processes are allowed (no pids cgroup, no RLIMIT_NPROC), and without "
    "root the harness has no pids cgroup of its own to contain it",
)
def test_a_fork_bomb_where_processes_are_allowed_stays_bounded(harness: HarnessProcess, targets: Targets) -> None:
    report = attack(harness, targets, escaped("traceback_frames", attacks.FORK_LOOP), tenant="procs")
    assert_ends_near_limit(report, {"CodeError", "WorkerCrashed", "TimeLimitExceeded"})


def test_a_daemon_where_processes_are_allowed_does_not_outlive_its_run(
    harness: HarnessProcess, targets: Targets
) -> None:
    report = attack(harness, targets, escaped("subclass_walk", attacks.DOUBLE_FORK_DAEMON), tenant="procs")
    assert output_value(report, "seen_during_run") is True
    after = attack(harness, targets, escaped("random_os", attacks.LIST_PROCESSES), tenant="procs")
    assert output_value(after, "pids") == [1, 2], "the next run of the tenant still sees the daemon"


LEFT_BEHIND = {
    "timer-handler": attacks.IDLE_TIMER_HANDLER,
    "spin-after-reply": attacks.SPIN_AFTER_REPLY,
    "profile-hook": attacks.PROFILE_HOOK_SPIN,
    "thread-from-a-later-signal": attacks.THREAD_FROM_A_LATER_SIGNAL,
    "misleading-name": attacks.MISLEADING_NAME_THEN_SPIN,
}


@pytest.mark.parametrize("body", LEFT_BEHIND.values(), ids=LEFT_BEHIND.keys())
def test_a_warm_worker_that_uses_cpu_between_runs_is_ended(
    harness: HarnessProcess, targets: Targets, body: str
) -> None:
    """Code a run leaves behind that runs after its reply: the host's idle watch ends the worker."""
    report = attack(harness, targets, escaped("subclass_walk", body), watch_idle_worker_s=3.0)
    assert output_value(report, "armed") is True
    used = report["worker_idle_cpu_s"]
    assert used is not None, "the worker kept burning CPU between runs"
    assert used < IDLE_CPU_ALLOWANCE_S + 0.6
    assert report["worker_pid"] not in report["workers_after"]


@pytest.mark.parametrize("spin", [True, False], ids=["spinning", "asleep"])
def test_a_process_left_behind_by_undoing_the_clean_up_goes_with_its_worker(
    harness: HarnessProcess, targets: Targets, spin: bool
) -> None:
    """The worker's own clean-up of a run's processes can be undone by the run;
    the host's idle watch (its pids cgroup here) still ends the worker and the leftover."""
    code = escaped("subclass_walk", attacks.LEFTOVER_AFTER_UNDOING_CLEANUP)
    report = attack(harness, targets, code, tenant="procs", extra_inputs={"spin": spin})
    assert output_value(report, "armed") is True
    assert report["worker_pid"] not in report["workers_after"], "the worker with a process left behind was kept"


def test_a_thread_left_running_retires_its_worker(harness: HarnessProcess, targets: Targets) -> None:
    report = attack(harness, targets, escaped("traceback_frames", attacks.THREAD_LEFT_RUNNING))
    assert output_value(report, "started") is True
    assert lost_workers(report), "the worker with a thread still running was reused"


# --- signals and rlimits aimed outside the worker ------------------------------------------


@pytest.mark.parametrize(
    "route, body",
    [
        ("random_os", attacks.KILL_PARENT),
        ("gc_objects", attacks.KILL_EVERYONE),
    ],
    ids=["kill-parent", "kill-minus-one"],
)
def test_killing_the_parent_or_everyone_hurts_at_most_the_worker_itself(
    harness: HarnessProcess, targets: Targets, route: str, body: str
) -> None:
    report = attack(harness, targets, escaped(route, body))
    assert report["outcome"] in {"ok", "CodeError", "WorkerCrashed"}, report["message"][:300]
    assert len(lost_workers(report)) <= 1


@pytest.mark.parametrize(
    "route, body",
    [
        ("asyncio_reexport", attacks.KILL_INIT),
        ("traceback_frames", attacks.PIDFD_KILL_INIT),
    ],
    ids=["kill", "pidfd_send_signal"],
)
def test_the_worker_cannot_kill_its_pid_1(harness: HarnessProcess, targets: Targets, route: str, body: str) -> None:
    report = attack(harness, targets, escaped(route, body))
    assert report["outcome"] in {"ok", "CodeError"}, report["message"][:300]
    assert not lost_workers(report), "the worker's namespace died with its init"


def test_signals_reach_nothing_outside_the_worker(harness: HarnessProcess, targets: Targets) -> None:
    report = attack(harness, targets, escaped("subclass_walk", attacks.SIGNAL_SCAN))
    assert set(output_value(report, "reached")) <= {1}, "signal 0 reached a process other than its own init"


def test_ptrace_and_cross_process_memory_reads_of_pid_1_are_refused(harness: HarnessProcess, targets: Targets) -> None:
    report = attack(harness, targets, escaped("gc_objects", attacks.PTRACE_INIT))
    assert output_value(report, "results") == {"ptrace_attach": [-1, 1], "process_vm_readv": [-1, 1]}  # EPERM


def test_root_new_namespaces_mounts_and_chroot_stay_out_of_reach(harness: HarnessProcess, targets: Targets) -> None:
    report = attack(harness, targets, escaped("allowed_module_globals", attacks.REGAIN_PRIVILEGES))
    assert output_value(report, "succeeded") == []


def test_no_rlimit_can_be_changed_not_even_the_workers_own(harness: HarnessProcess, targets: Targets) -> None:
    report = attack(harness, targets, escaped("generator_frame", attacks.PRLIMIT_PARENT))
    assert_refused(report)
    assert not lost_workers(report), "a refused attempt should not cost the worker"


def test_prlimit_of_pid_1_is_refused_as_root(harness: HarnessProcess, targets: Targets) -> None:
    report = attack(harness, targets, escaped("random_os", attacks.PRLIMIT_INIT))
    if IS_ROOT:
        assert_refused(report)  # init is root's, the worker has a uid of its own
    else:  # init shares the worker's uid in its user namespace; only the worker's own namespace is touched
        assert report["outcome"] in {"ok", "CodeError"}, report["message"][:300]


def test_prlimit_of_any_other_pid_is_refused(harness: HarnessProcess, targets: Targets) -> None:
    report = attack(harness, targets, escaped("gc_objects", attacks.PRLIMIT_SCAN))
    assert output_value(report, "changed") == []


# --- the supervisor's environment and the host's files -----------------------------------------


@pytest.mark.parametrize("route", ["traceback_frames", "asyncio_reexport"])
def test_no_environment_or_proc_file_holds_the_supervisors_secret(
    harness: HarnessProcess, targets: Targets, route: str
) -> None:
    report = attack(harness, targets, escaped(route, attacks.READ_ENVIRONMENTS))
    assert report["outcome"] == "ok", report["message"][:300]
    assert "/proc/1/environ" in report["stdout"]  # the code ran and printed what it found


def test_the_secret_scan_finds_a_secret_the_policy_passes_on_purpose(harness: HarnessProcess) -> None:
    report = harness.run(
        escaped("random_os", f"os = _mod('os')\nleak = os.environ['{SECRET_VARIABLE}']\n"), tenant="envpass"
    )
    assert report["secret_found_in"] == ["outputs['leak']"]
    assert harness.secret in report_text(report)


def test_the_host_file_system_is_unreachable_through_init(harness: HarnessProcess, targets: Targets) -> None:
    report = attack(harness, targets, escaped("allowed_module_globals", attacks.READ_HOST_THROUGH_INIT))
    attempts = output_value(report, "attempts")
    assert all(isinstance(result, int) for result in attempts.values()), f"read through init: {attempts}"


@pytest.mark.parametrize("route", ["subclass_walk", "gc_objects"])
def test_nothing_outside_the_scratch_space_can_be_written(
    harness: HarnessProcess, targets: Targets, route: str
) -> None:
    report = attack(harness, targets, escaped(route, attacks.WRITE_EVERYWHERE))
    assert output_value(report, "written") == []


# --- network ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "code",
    [
        escaped("asyncio_reexport", attacks.TCP_CONNECT),
        escaped("random_os", attacks.UDP_SEND),
        attacks.OPEN_CONNECTION_VIA_LOOP,
        attacks.DATAGRAM_VIA_LOOP,
    ],
    ids=["tcp", "udp", "loop-tcp", "loop-udp"],
)
def test_the_host_listeners_are_unreachable(harness: HarnessProcess, targets: Targets, code: str) -> None:
    report = attack(harness, targets, code)
    assert report["outcome"] == "CodeError", report["message"][:300]


def test_no_socket_family_but_unix_can_be_created(harness: HarnessProcess, targets: Targets) -> None:
    report = attack(harness, targets, escaped("gc_objects", attacks.SOCKET_FAMILIES))
    assert output_value(report, "created") == []


def test_the_listeners_do_see_a_tenant_that_may_use_the_network(harness: HarnessProcess, targets: Targets) -> None:
    report = harness.run(escaped("asyncio_reexport", attacks.TCP_CONNECT), targets.inputs(), tenant="net")
    assert report["outcome"] == "ok", report["message"][:300]
    targets.listeners.poll()
    assert targets.listeners.accepted == [b"pwned"]


# --- space: /dev/shm, sparse files, a real disk fill ------------------------------------------------


def _assert_fill_bounded(report: dict) -> None:
    sizes = output_value(report, "sizes")
    assert max(sizes) <= LIMITS.max_file_size_mb * MiB, sizes
    assert sum(sizes) <= (LIMITS.scratch_mb + 2 * LIMITS.tmp_mb) * MiB, sizes  # one tmpfs holds all three
    assert report["scratch_largest"] <= LIMITS.max_file_size_mb * MiB


@pytest.mark.parametrize(
    "route, directory",
    [("random_os", "/dev/shm"), ("asyncio_reexport", "."), ("subclass_walk", "/tmp")],
    ids=["dev-shm", "scratch", "tmp"],
)
def test_filling_space_is_bounded_by_the_policy(
    harness: HarnessProcess, targets: Targets, route: str, directory: str
) -> None:
    report = attack(
        harness, targets, escaped(route, attacks.FILL), extra_inputs={"directory": directory}, inspect_scratch=True
    )
    _assert_fill_bounded(report)


def test_sparse_files_cannot_exceed_the_file_size_limit(harness: HarnessProcess, targets: Targets) -> None:
    report = attack(harness, targets, escaped("generator_frame", attacks.SPARSE_FILES), inspect_scratch=True)
    assert output_value(report, "errors") == {"truncate": 27, "seek_and_write": 27, "fallocate": 27}  # EFBIG
    assert output_value(report, "size") <= LIMITS.max_file_size_mb * MiB
    assert report["scratch_largest"] <= LIMITS.max_file_size_mb * MiB


def test_memory_in_memfd_files_is_refused(harness: HarnessProcess, targets: Targets) -> None:
    # memfd pages written but never mapped escape RLIMIT_DATA and RSS: seccomp refuses memfd_create.
    report = attack(harness, targets, escaped("random_os", attacks.MEMFD_HOG), extra_inputs={"files": MEMFD_FILES})
    assert_refused(report)


def test_system_v_shared_memory_is_refused(harness: HarnessProcess, targets: Targets) -> None:
    report = attack(harness, targets, escaped("gc_objects", attacks.SYSV_SHARED_MEMORY))
    assert report["outcome"] == "ok", report["message"][:300]
    assert output_value(report, "errno") == 1  # EPERM


# --- threads and file descriptors -----------------------------------------------------------------


def test_a_thread_bomb_is_bounded(harness: HarnessProcess, targets: Targets) -> None:
    report = attack(harness, targets, escaped("traceback_frames", attacks.THREAD_BOMB))
    assert output_value(report, "started") <= 2 * LIMITS.max_threads
    assert lost_workers(report), "the worker with threads still running was reused"


def test_spinning_threads_end_at_the_cpu_limit(harness: HarnessProcess, targets: Targets) -> None:
    report = attack(harness, targets, escaped("gc_objects", attacks.SPINNING_THREADS))
    assert_ends_near_limit(report, {"TimeLimitExceeded"})


@pytest.mark.parametrize("kind", ["files", "pipes", "socketpairs", "eventfds"])
def test_file_descriptor_exhaustion_is_bounded_by_the_policy(
    harness: HarnessProcess, targets: Targets, kind: str
) -> None:
    report = attack(
        harness, targets, escaped("random_os", attacks.FD_EXHAUSTION), extra_inputs={"kind": kind, "close": True}
    )
    assert output_value(report, "stopped_by") == 24  # EMFILE
    assert output_value(report, "count") <= LIMITS.max_open_files


def test_file_descriptors_leaked_by_a_run_harm_nothing_outside_the_worker(
    harness: HarnessProcess, targets: Targets
) -> None:
    report = attack(
        harness,
        targets,
        escaped("subclass_walk", attacks.FD_EXHAUSTION),
        extra_inputs={"kind": "files", "close": False},
        ignore=frozenset({"next_run"}),
    )
    assert output_value(report, "count") <= LIMITS.max_open_files


def test_file_descriptors_leaked_by_a_run_do_not_break_the_next_run(harness: HarnessProcess, targets: Targets) -> None:
    report = harness.run(escaped("subclass_walk", attacks.FD_EXHAUSTION), targets.inputs(kind="files", close=False))
    assert report["next_run"]["ok"], report["next_run"]["detail"]


@pytest.mark.parametrize("how", ["close", "replace"])
def test_a_run_that_closes_or_replaces_its_channel_loses_only_its_worker(
    harness: HarnessProcess, targets: Targets, how: str
) -> None:
    report = attack(harness, targets, escaped("traceback_frames", attacks.CHANNEL_TAMPERING), extra_inputs={"how": how})
    assert report["outcome"] == "WorkerCrashed", f"{report['outcome']}: {report['message'][:300]}"
    assert len(lost_workers(report)) == 1


# --- crashes, stops and C-level hogs -----------------------------------------------------------------


@pytest.mark.parametrize(
    "route, body, signum",
    [
        ("gc_objects", attacks.NULL_DEREFERENCE, 11),
        ("traceback_frames", attacks.ABORT, 6),
        ("random_os", attacks.SELF_SIGSEGV, 11),
        ("allowed_module_globals", attacks.FAULTHANDLER_SIGSEGV, 11),
    ],
    ids=["string_at-0", "abort", "kill-self-sigsegv", "faulthandler"],
)
def test_a_crashing_worker_is_reported_and_replaced(
    harness: HarnessProcess, targets: Targets, route: str, body: str, signum: int
) -> None:
    report = attack(harness, targets, escaped(route, body))
    assert report["outcome"] == "WorkerCrashed", report["message"][:300]
    assert report["attributes"]["signal"] == signum
    assert lost_workers(report)


@pytest.mark.parametrize(
    "route, body",
    [
        ("asyncio_reexport", attacks.SELF_SIGSTOP),
        ("subclass_walk", attacks.GROUP_SIGSTOP),
        ("generator_frame", attacks.RAISE_SIGTSTP),
    ],
    ids=["sigstop-self", "sigstop-group", "sigtstp"],
)
def test_a_stopped_worker_ends_near_the_wall_limit(
    harness: HarnessProcess, targets: Targets, route: str, body: str
) -> None:
    report = attack(harness, targets, escaped(route, body))
    # SIGTSTP is discarded for a worker's orphaned process group, so that run just ends.
    assert_ends_near_limit(report, {"TimeLimitExceeded", "WorkerCrashed", "ok"})


@pytest.mark.parametrize(
    "code",
    [attacks.REGEX_BACKTRACKING, attacks.BIG_POWER, attacks.FACTORIAL, attacks.PBKDF2],
    ids=["regex", "big-power", "factorial", "pbkdf2"],
)
def test_a_c_level_cpu_hog_ends_near_the_limit(harness: HarnessProcess, targets: Targets, code: str) -> None:
    assert_ends_near_limit(attack(harness, targets, code), {"TimeLimitExceeded"})
