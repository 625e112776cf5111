"""The small kernel-facing helpers forked processes use instead of the
stdlib's heavier wrappers (runtime.linux, the zygote's cgroup names): they
must do exactly what the wrappers did."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

from sandbox.runtime import linux, zygote

REPO = Path(__file__).resolve().parent.parent


def _in_new_interpreter(program: str) -> dict:
    """Run ``program`` in a new interpreter (a process whose signal state is its
    own) and return the JSON it prints last."""
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(program)], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


def test_write_file_creates_truncates_and_read_file_reads_back(tmp_path: Path) -> None:
    path = str(tmp_path / "passwd")
    linux.write_file(path, b"a much longer first line\n", create=True)
    linux.write_file(path, b"short\n", create=True)
    assert linux.read_file(path) == b"short\n"
    assert linux.read_file(path, limit=3) == b"sho"


def test_write_file_without_create_refuses_a_missing_file(tmp_path: Path) -> None:
    missing = str(tmp_path / "memory.max")
    try:
        linux.write_file(missing, b"1")
    except FileNotFoundError:
        pass
    else:
        raise AssertionError("write_file created a file it was not asked to create")
    assert not os.path.exists(missing)


def test_reset_signal_state_sets_defaults_ignores_and_unblocks() -> None:
    state = _in_new_interpreter(
        """
        import json, os, signal
        from sandbox.runtime import linux

        signal.signal(signal.SIGTERM, lambda *_: None)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGUSR1])
        _, wakeup_w = os.pipe()
        os.set_blocking(wakeup_w, False)
        signal.set_wakeup_fd(wakeup_w)
        linux.reset_signal_state(defaults=(signal.SIGTERM,), ignored=(signal.SIGCHLD,))
        with open("/proc/self/status") as f:
            fields = [line.partition(":") for line in f]
        masks = {key: int(value, 16) for key, _, value in fields if key in ("SigBlk", "SigIgn", "SigCgt")}
        print(json.dumps({
            **masks,
            "wakeup": signal.set_wakeup_fd(-1),
            "term": signal.getsignal(signal.SIGTERM) == signal.SIG_DFL,
            "chld": signal.getsignal(signal.SIGCHLD) == signal.SIG_IGN,
        }))
        """
    )
    assert state["SigBlk"] == 0
    assert not state["SigCgt"] & (1 << (signal.SIGTERM - 1))
    assert state["SigIgn"] & (1 << (signal.SIGCHLD - 1))
    assert state["wakeup"] == -1 and state["term"] and state["chld"]


def test_set_name_sets_comm_and_prctl_reports_errors() -> None:
    reported = _in_new_interpreter(
        """
        import json
        from sandbox.runtime import linux

        linux.set_name(b"sandbox-test-name-longer-than-comm")
        with open("/proc/self/comm") as f:
            comm = f.read().strip()
        try:
            linux.prctl(-1)
        except OSError as exc:
            print(json.dumps({"comm": comm, "errno": exc.errno}))
        else:
            print(json.dumps({"comm": comm, "errno": None}))
        """
    )
    assert reported == {"comm": "sandbox-test-na", "errno": 22}


def test_new_group_skips_a_name_a_crashed_zygote_left(tmp_path: Path) -> None:
    left_behind = {f"w{n}" for n in range(200)}  # the counter starts at 0 in each zygote
    for name in left_behind:
        (tmp_path / name).mkdir()
    made = {os.path.basename(zygote._new_group(str(tmp_path))) for _ in range(3)}
    assert len(made) == 3 and not made & left_behind
    assert all((tmp_path / name).is_dir() for name in made)
