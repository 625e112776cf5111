"""Hostile code against host mounts and run files, in a throwaway PID namespace.

The read-only source is world-writable on the host on purpose: the worker's
uid could write it, so only the read-only bind (and landlock) stand between
a run and the host's files. Every route is tried: plain writes, create,
rename into, out of and within the mount, hard links, chmod/utime/xattr,
and re-opening an ``O_PATH`` fd for writing through /proc. Symbolic links in
the mount point at the host's /etc/shadow, at ``../../..`` and at a host
file that is not mounted. Runs also fill ./out/ with what the collector
must not read, and over-limit files. Both supervisors are tried: root (a
uid per worker) and the unprivileged one (uid 65534, a user namespace).
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from sandbox.profile import MOUNT_GID
from tests.conftest import IS_ROOT
from tests.hostile.attacks import escaped
from tests.hostile.checks import Targets, attack, output_value
from tests.hostile.client import UNPRIVILEGED_UID, HarnessProcess, unprivileged_unavailable

POLICY = {"wall_time_s": 3, "cpu_time_s": 2, "max_output_bytes": 256 * 1024}
ROUTE = "subclass_walk"
UNAVAILABLE = unprivileged_unavailable()
SUPERVISORS = [
    "root",
    pytest.param(
        "unprivileged",
        marks=pytest.mark.skipif(UNAVAILABLE is not None, reason=f"unprivileged harness unavailable: {UNAVAILABLE}"),
    ),
]

WRITE_ROUTES = """
os = _mod("os")
refused = {}
def attempt(name, action):
    try:
        action()
    except OSError as exc:
        refused[name] = exc.errno
    else:
        refused[name] = "ALLOWED"
def reopen_o_path():
    fd = os.open("/data/file1.txt", os.O_PATH)
    os.open(f"/proc/self/fd/{fd}", os.O_WRONLY)
def reopen_o_path_dir():
    fd = os.open("/data", os.O_PATH | os.O_DIRECTORY)
    os.open("new.txt", os.O_WRONLY | os.O_CREAT, dir_fd=os.open(f"/proc/self/fd/{fd}", os.O_RDONLY))
def rename_in():
    open("/work/x", "w").close()
    os.rename("/work/x", "/data/x")
attempt("append", lambda: open("/data/file1.txt", "a").write("!"))
attempt("truncate", lambda: os.truncate("/data/file1.txt", 0))
attempt("create", lambda: open("/data/new.txt", "w"))
attempt("mkdir", lambda: os.mkdir("/data/dir"))
attempt("symlink", lambda: os.symlink("/etc", "/data/link"))
attempt("unlink", lambda: os.unlink("/data/file1.txt"))
attempt("rename_within", lambda: os.rename("/data/file1.txt", "/data/moved.txt"))
attempt("rename_out_to_scratch", lambda: os.rename("/data/file1.txt", "/work/stolen.txt"))
attempt("rename_out_to_writable", lambda: os.rename("/data/file1.txt", "/output/stolen.txt"))
attempt("rename_in", rename_in)
attempt("hard_link_within", lambda: os.link("/data/file1.txt", "/data/hard"))
attempt("hard_link_to_scratch", lambda: os.link("/data/file1.txt", "/work/hard"))
attempt("hard_link_to_writable", lambda: os.link("/data/file1.txt", "/output/hard"))
attempt("chmod", lambda: os.chmod("/data/file1.txt", 0o777))
attempt("utime", lambda: os.utime("/data/file1.txt", (0, 0)))
attempt("setxattr", lambda: os.setxattr("/data/file1.txt", "user.x", b"1"))
attempt("o_path_reopen", reopen_o_path)
attempt("o_path_dir_reopen", reopen_o_path_dir)
"""

SYMLINK_ESCAPES = """
os = _mod("os")
root = sorted(os.listdir("/"))
up = sorted(os.listdir("/data/up"))
reached = {}
for path in ("/data/shadow", "/data/up/etc/shadow", "/data/host_file", "/data/up" + HOST_FILE):
    try:
        reached[path] = open(path).read()
    except OSError as exc:
        reached[path] = exc.errno
"""

HOSTILE_OUT = """
os = _mod("os")
os.symlink("/etc/shadow", "out/shadow")
os.symlink("/data/file1.txt", "out/data")
os.symlink("..", "out/parent")
os.link("data.csv", "out/hard")  # a hard link is a regular file of the scratch space: its bytes come back
os.makedirs("out/deep/er")
os.symlink("/", "out/deep/er/root")
"""


@pytest.fixture(scope="module", params=SUPERVISORS)
def mounted(request) -> Iterator[tuple[HarnessProcess, Path, Path, Path]]:
    unprivileged = request.param == "unprivileged"
    base = Path(tempfile.mkdtemp(prefix="hostile-mounts-"))
    base.chmod(0o755)
    data, output = base / "data", base / "output"
    data.mkdir()
    output.mkdir()
    data.chmod(0o777)  # writable by anyone on the host: only the mount keeps it read-only
    for i in (1, 2, 3):
        (data / f"file{i}.txt").write_text(f"file {i}")
        (data / f"file{i}.txt").chmod(0o666)
    host_file = base / "host-only.txt"
    host_file.write_text("never mounted")
    (data / "shadow").symlink_to("/etc/shadow")
    (data / "up").symlink_to("../../..")
    (data / "host_file").symlink_to(host_file)
    if unprivileged:
        os.chown(output, UNPRIVILEGED_UID, UNPRIVILEGED_UID)
    elif IS_ROOT:
        os.chown(output, -1, MOUNT_GID)
        output.chmod(0o2770)
    mounts = [
        {"source": str(data), "target": "/data"},
        {"source": str(output), "target": "/output", "writable": True},
    ]
    tenants = {
        "default": {**POLICY, "mounts": mounts, "max_file_size_mb": 1},
        "few": {**POLICY, "max_out_files": 5, "max_out_files_bytes": 4096},
        "raw": {**POLICY, "skip_layers": ["seccomp"]},  # can make FIFOs and sockets
    }
    harness = HarnessProcess(tenants, unprivileged=unprivileged)
    yield harness, data, output, host_file
    harness.close()
    shutil.rmtree(base)


@pytest.fixture
def harness(mounted) -> HarnessProcess:
    return mounted[0]


def _snapshot(directory: Path) -> dict[str, tuple[int, int, bytes | str]]:
    """Name -> (mode, mtime_ns, content or link target) of every entry: what no run may change."""
    entries = {}
    for entry in sorted(directory.iterdir()):
        st = entry.lstat()
        content = os.readlink(entry) if entry.is_symlink() else entry.read_bytes()
        entries[entry.name] = (st.st_mode, st.st_mtime_ns, content)
    return entries


def test_a_readonly_mount_refuses_writes_by_every_route(mounted, targets: Targets):
    harness, data, output, _ = mounted
    before = _snapshot(data)
    report = attack(harness, targets, escaped(ROUTE, WRITE_ROUTES))
    refused = output_value(report, "refused")
    assert [name for name, errno in refused.items() if errno == "ALLOWED"] == []
    assert len(refused) == 18
    assert _snapshot(data) == before
    assert sorted(p.name for p in output.iterdir()) == []


def test_symlinks_in_a_mount_resolve_inside_the_sandbox(mounted, targets: Targets):
    harness, _, _, host_file = mounted
    report = attack(harness, targets, escaped(ROUTE, SYMLINK_ESCAPES), extra_inputs={"HOST_FILE": str(host_file)})
    assert output_value(report, "up") == output_value(report, "root")
    reached = output_value(report, "reached")
    assert reached == dict.fromkeys(reached, 2), reached  # ENOENT for each: the host's paths are not there


def test_a_writable_mount_takes_writes_that_are_then_on_the_host_within_rlimit_fsize(mounted, targets: Targets):
    harness, _, output, _ = mounted
    code = escaped(
        ROUTE,
        'os = _mod("os")\n'
        'open("/output/combined.txt", "w").write("written inside")\n'
        "try:\n"
        '    open("/output/big", "wb").write(b"x" * (2 * 1024 * 1024))\n'
        "except OSError as exc:\n"
        "    big = exc.errno\n",
    )
    try:
        report = attack(harness, targets, code)
        assert output_value(report, "big") == 27  # EFBIG
        assert (output / "combined.txt").read_text() == "written inside"
        assert (output / "big").stat().st_size == 1024 * 1024
    finally:
        for entry in output.iterdir():
            entry.unlink()


def test_hostile_entries_in_out_are_reported_and_never_followed(mounted, targets: Targets):
    harness = mounted[0]
    report = attack(harness, targets, escaped(ROUTE, HOSTILE_OUT), files={"data.csv": b"a,b\n"})
    assert report["outcome"] == "ok", report["message"]
    assert {p: base64.b64decode(v) for p, v in report["files"].items()} == {"hard": b"a,b\n"}
    assert report["skipped_files"] == {
        "shadow": "symbolic link (never followed)",
        "data": "symbolic link (never followed)",
        "parent": "symbolic link (never followed)",
        "deep/er/root": "symbolic link (never followed)",
    }


def test_fifos_and_sockets_in_out_never_block_or_get_read(mounted, targets: Targets):
    harness = mounted[0]
    code = escaped(
        ROUTE,
        'os = _mod("os")\nsocket = _mod("socket")\n'
        'os.mkfifo("out/fifo")\n'
        '_s = socket.socket(socket.AF_UNIX)\n_s.bind("out/sock")\n'
        'open("out/ok", "w").write("ok")\n',
    )
    report = attack(harness, targets, code, tenant="raw")
    assert report["outcome"] == "ok", report["message"]
    assert report["skipped_files"] == {"fifo": "FIFO (never read)", "sock": "socket (never read)"}
    assert list(report["files"]) == ["ok"]


@pytest.mark.parametrize(
    "body, limit",
    [
        ("for i in range(50):\n    open(f'out/{i}', 'w').write('x')\n", "max_out_files"),
        ("open('out/big', 'wb').write(b'x' * 5000)\n", "max_out_files_bytes"),
        ("os = _mod('os')\nfor i in range(50):\n    os.symlink('/etc/shadow', f'out/{i}')\n", "max_out_files"),
    ],
    ids=["count", "bytes", "skipped_count"],
)
def test_over_limit_out_files_fail_the_run_naming_the_limit(mounted, targets: Targets, body, limit):
    harness = mounted[0]
    report = attack(harness, targets, escaped(ROUTE, body), tenant="few")
    assert report["outcome"] == "OutputLimitExceeded", report["message"]
    assert report["attributes"]["limit"] == limit and limit in report["message"]


@pytest.mark.parametrize("path", ["../../etc/x", "/etc/x", "a/../../x"])
def test_path_traversal_in_files_is_refused_before_the_run(mounted, targets: Targets, path):
    harness = mounted[0]
    report = harness.run("x = 1", files={path: b"payload"})
    assert report["outcome"] == "InputError" and repr(path) in report["message"]
    assert json.dumps(report).count("payload") == 0
