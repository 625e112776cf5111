"""What a supervisor killed with SIGKILL leaves on the host is removed by the
next one to start, and nothing of a live supervisor is touched."""

from __future__ import annotations

import contextlib
import glob
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator

import psutil
import pytest

from sandbox import Sandbox, leftovers
from sandbox.unprivileged import call_as_user, interpreter_paths
from tests.conftest import IS_ROOT, REPO, quick_policy

_NOBODY = 65534

# A supervisor in a process of its own: starts a pool, runs once, prints its
# owner tag, and closes when its stdin does.
_SUPERVISOR = """
import asyncio, sys
from sandbox import Policy, Sandbox, leftovers

async def main():
    # Without a mount namespace (nor landlock, which needs one): each worker then
    # also has a scratch directory on the host.
    async with Sandbox(Policy(wall_time_s=5.0, skip_layers=["mountns", "landlock"]), workers=2) as sandbox:
        await sandbox.run("x = 1")
        print(leftovers.owner_tag(), flush=True)
        await asyncio.to_thread(sys.stdin.read)

asyncio.run(main())
"""


class _Supervisor:
    def __init__(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-c", _SUPERVISOR], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO
        )
        assert self.process.stdout is not None
        self.owner = self.process.stdout.readline().strip()
        assert self.owner, "the supervisor did not start"
        self.tree = self._settled_tree()

    def _settled_tree(self) -> list[psutil.Process]:
        """The supervisor and its descendants once none is still exiting.

        The Sandbox's start probes the host with a worker it kills at once; on
        a busy machine that worker and its init can still be dying, or be
        zombies not yet reaped, when the supervisor prints its tag. Taken then,
        the tree would name processes about to vanish (and their cgroups).
        """
        top = psutil.Process(self.process.pid)
        deadline = time.monotonic() + 10
        while True:
            tree = [top, *top.children(recursive=True)]
            with contextlib.suppress(psutil.NoSuchProcess):
                exiting = [p for p in tree if p.status() in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD)]
                time.sleep(0.2)
                if not exiting and {p.pid for p in tree} == {p.pid for p in [top, *top.children(recursive=True)]}:
                    return tree
            assert time.monotonic() < deadline, f"the supervisor's processes did not settle: {tree}"

    def close(self) -> None:
        if self.process.poll() is None:
            assert self.process.stdin is not None
            self.process.stdin.close()
            self.process.wait(timeout=30)

    def kill(self) -> None:
        """SIGKILL the supervisor, its zygote stopped first so that it cannot tidy up
        either (as when a whole service is killed at once; on its own, a zygote
        that sees its supervisor hang up starts removing its workers' directories)."""
        for process in self.tree[1:]:
            process.suspend()
        self.process.kill()
        self.process.wait()
        _, alive = psutil.wait_procs(self.tree, timeout=15)
        assert not alive, f"the killed supervisor's processes outlived it: {alive}"
        # A standby forked after self.tree was taken dies with the zygote too, a moment later;
        # until it has, the kernel keeps its cgroup (the sweep would leave it for the next start).
        deadline = time.monotonic() + 15
        while _tasks_in(_entries(self.owner)) and time.monotonic() < deadline:
            time.sleep(0.05)


def _entries(owner: str) -> set[str]:
    """Every host entry named with ``owner``'s tag: scratch directories, cgroups, its lock."""
    found = set(glob.glob(os.path.join(leftovers.HOST_TMP, f"sandbox-w*-{owner}-*")))
    found |= set(glob.glob(leftovers.lock_path(owner)))
    for top, dirs, _ in os.walk("/sys/fs/cgroup"):
        found |= {os.path.join(top, d) for d in dirs if d.startswith("sandbox-") and f"-{owner}-" in d}
        dirs[:] = [d for d in dirs if not d.startswith("sandbox-")]  # workers' groups live inside these
    return found


def _tasks_in(entries: set[str]) -> list[str]:
    """The processes still inside any of these cgroups (or their workers' groups)."""
    tasks = []
    for entry in entries:
        for top, _, files in os.walk(entry):
            if "cgroup.procs" in files:
                try:
                    with open(os.path.join(top, "cgroup.procs")) as f:
                        tasks += f.read().split()
                except OSError:
                    pass  # removed meanwhile
    return tasks


@pytest.fixture
def live_supervisor() -> Iterator[_Supervisor]:
    supervisor = _Supervisor()
    yield supervisor
    supervisor.close()


async def test_a_killed_supervisors_leftovers_go_at_the_next_start(live_supervisor: _Supervisor) -> None:
    killed = _Supervisor()
    left = _entries(killed.owner)
    scratch = [e for e in left if os.path.basename(e).startswith("sandbox-w")]
    assert len(scratch) >= 2, f"each worker should have a scratch directory: {left}"
    if IS_ROOT:
        assert any(e.startswith("/sys/fs/cgroup/") for e in left), f"no cgroups to leave behind: {left}"
    live = _entries(live_supervisor.owner)
    assert live, "the live supervisor should have host entries"
    killed.kill()
    assert _entries(killed.owner) == left, "SIGKILL gives no chance to clean up: all of it should still be there"

    async with Sandbox(quick_policy(), workers=1) as sandbox:
        await sandbox.run("x = 1")
        assert _entries(killed.owner) == set()
        assert live <= _entries(live_supervisor.owner), "a live supervisor's entries must stay"


@pytest.fixture
def tmp_entries() -> Iterator[list[str]]:
    made: list[str] = []
    yield made
    for path in made:
        subprocess.run(["rm", "-rf", "--", path], check=True)


def _leave(made: list[str], owner: str, *, lock_uid: int | None) -> str:
    """A scratch directory of ``owner``, and its owner's lock file unless ``lock_uid`` is None (unlocked)."""
    directory = os.path.join(leftovers.HOST_TMP, f"sandbox-w7-{owner}-test")
    os.mkdir(directory)
    made.append(directory)
    if lock_uid is not None:
        lock = leftovers.lock_path(owner)
        with open(lock, "x") as f:
            f.write("1\n")  # a pid in the file means nothing: a live process has pid 1
        os.chown(lock, lock_uid, -1)
        made.append(lock)
    return directory


def test_an_unheld_lock_is_a_dead_owner_whatever_its_pid(tmp_entries: list[str]) -> None:
    directory = _leave(tmp_entries, secrets.token_hex(4), lock_uid=os.geteuid())
    leftovers.sweep()
    assert not os.path.lexists(directory)
    assert not os.path.lexists(tmp_entries[1]), "the dead owner's lock file goes last"


def test_entries_that_no_lock_of_ours_vouches_for_are_left_alone(tmp_entries: list[str]) -> None:
    """An entry without a lock file (an older version's) or with another user's cannot be judged."""
    kept = [_leave(tmp_entries, secrets.token_hex(4), lock_uid=None)]
    if IS_ROOT:
        kept.append(_leave(tmp_entries, secrets.token_hex(4), lock_uid=_NOBODY))
    leftovers.sweep()
    assert all(os.path.isdir(directory) for directory in kept)


def test_a_symlink_named_as_a_leftover_is_not_followed(tmp_entries: list[str], tmp_path) -> None:
    owner = secrets.token_hex(4)
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep").write_text("x")
    link = os.path.join(leftovers.HOST_TMP, f"sandbox-w7-{owner}-link")
    os.symlink(victim, link)
    tmp_entries.append(link)
    _leave(tmp_entries, owner, lock_uid=os.geteuid())
    leftovers.sweep()
    assert (victim / "keep").read_text() == "x"


def test_this_process_holds_its_own_lock() -> None:
    owner = leftovers.owner_tag()
    leftovers.sweep()
    assert os.path.exists(leftovers.lock_path(owner))
    assert leftovers.owner_tag() == owner


@pytest.mark.skipif(not IS_ROOT, reason="acting as uid 65534 needs root")
def test_an_unprivileged_sweep_removes_its_own_uids_leftovers_only(tmp_entries: list[str]) -> None:
    ours = _leave(tmp_entries, secrets.token_hex(4), lock_uid=_NOBODY)
    os.chown(ours, _NOBODY, _NOBODY)
    roots = _leave(tmp_entries, secrets.token_hex(4), lock_uid=0)

    def sweep() -> dict[str, object]:
        leftovers.sweep()
        return {}

    report = call_as_user(sweep, _NOBODY, interpreter_paths())
    assert "error" not in report, report
    assert not os.path.lexists(ours)
    assert os.path.isdir(roots)
