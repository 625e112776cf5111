"""Host mounts: the seed pattern, what a mount shows, and the refusals at Sandbox start.

What hostile code can do against a mount (writes by every route, symbolic
links out of it) is in tests/test_hostile_mounts.py, in a throwaway PID
namespace.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from sandbox import ConfinementUnavailable, MountError, Policy, Sandbox
from sandbox.mounts import mount_problems
from sandbox.policies import DEFAULT_ALLOWED_MODULES, LAYERS
from sandbox.profile import MOUNT_GID, HostSupport, build_profile
from sandbox.unprivileged import call_as_user, interpreter_paths
from tests.conftest import IS_ROOT, quick_policy

# The workflow SDK's aiofiles example, unchanged: three files read concurrently, one written.
SEED_PATTERN = """
import aiofiles

async def read_file(path):
    async with aiofiles.open(path, 'r') as f:
        return await f.read()

files = ['/data/file1.txt', '/data/file2.txt', '/data/file3.txt']
contents = await asyncio.gather(*[read_file(f) for f in files])

async with aiofiles.open('/output/combined.txt', 'w') as f:
    await f.write('\\n'.join(contents))

result = {'files_processed': len(files), 'total_size': sum(len(c) for c in contents)}
"""


@pytest.fixture
def host_dirs() -> Iterator[tuple[Path, Path]]:
    """A read-only data dir and a writable output dir, granted to the workers as the README says."""
    base = Path(tempfile.mkdtemp(prefix="mounts-test-"))
    base.chmod(0o755)  # workers need search on every directory above a source
    data, output = base / "data", base / "output"
    data.mkdir(mode=0o755)
    output.mkdir()
    for i in (1, 2, 3):
        (data / f"file{i}.txt").write_text(f"contents of file {i}")
    if IS_ROOT:
        os.chown(output, -1, MOUNT_GID)  # root: the one group every worker of a tenant with mounts holds
        output.chmod(0o2770)
    yield data, output
    shutil.rmtree(base)


def _mounts(data: Path, output: Path) -> list[dict]:
    return [{"source": str(data), "target": "/data"}, {"source": str(output), "target": "/output", "writable": True}]


async def test_the_seed_pattern_reads_a_readonly_mount_and_writes_one_that_is_then_on_the_host(host_dirs):
    data, output = host_dirs
    policy = quick_policy(mounts=_mounts(data, output), allowed_modules=[*DEFAULT_ALLOWED_MODULES, "aiofiles.*"])
    async with Sandbox(policy, workers=1) as sb:
        r = await sb.run(SEED_PATTERN)
    expected = "\n".join(f"contents of file {i}" for i in (1, 2, 3))
    assert r.outputs["result"] == {"files_processed": 3, "total_size": len(expected) - 2}
    assert (output / "combined.txt").read_text() == expected


async def test_a_mount_shows_its_source_at_its_target_and_symlinks_resolve_inside(host_dirs):
    data, output = host_dirs
    (data / "shadow").symlink_to("/etc/shadow")
    (data / "up").symlink_to("../../..")
    outside = data.parent / "not-mounted.txt"
    outside.write_text("host only")
    (data / "absolute").symlink_to(outside)
    code = (
        "import random\nos = random._os\n"
        "listing = sorted(os.listdir('/data'))\n"
        "root = sorted(os.listdir('/'))\n"
        "up = sorted(os.listdir('/data/up'))\n"
        "reached = [p for p in ('/data/shadow', '/data/absolute', '/data/up/etc/shadow') if os.path.exists(p)]\n"
        "text = open('/data/file1.txt').read()\n"
    )
    async with Sandbox(quick_policy(mounts=_mounts(data, output)), workers=1) as sb:
        r = await sb.run(code)
    out = r.outputs
    assert out["listing"] == ["absolute", "file1.txt", "file2.txt", "file3.txt", "shadow", "up"]
    assert out["text"] == "contents of file 1"
    assert out["up"] == out["root"]  # ../../.. from /data is the sandbox's own root, not the host's
    assert out["reached"] == []  # neither the host's /etc/shadow nor a host file outside the mount
    assert "data" in out["root"] and "output" in out["root"]


async def test_a_single_file_can_be_mounted_read_only_at_a_path_of_its_own(host_dirs):
    data, _ = host_dirs
    settings = data / "file2.txt"
    settings.chmod(0o666)  # writable on the host: only the mount refuses the write
    code = (
        "text = open('/config/settings.txt').read()\n"
        "try:\n"
        "    open('/config/settings.txt', 'a')\n"
        "except OSError as e:\n"
        "    errno = e.errno\n"
    )
    async with Sandbox(
        quick_policy(mounts=[{"source": str(settings), "target": "/config/settings.txt"}]), workers=1
    ) as sb:
        r = await sb.run(code)
    assert r.outputs == {"text": "contents of file 2", "errno": 30}  # EROFS


async def test_a_writable_mount_still_obeys_max_file_size_mb(host_dirs):
    data, output = host_dirs
    code = (
        "try:\n"
        "    open('/output/big', 'wb').write(b'x' * (2 * 1024 * 1024))\n"
        "except OSError as e:\n"
        "    errno = e.errno\n"
    )
    async with Sandbox(quick_policy(mounts=_mounts(data, output), max_file_size_mb=1), workers=1) as sb:
        r = await sb.run(code)
    assert r.outputs["errno"] == 27  # EFBIG: RLIMIT_FSIZE
    assert (output / "big").stat().st_size == 1024 * 1024


@pytest.mark.parametrize(
    "target, clash",
    [
        ("/usr/lib/x", "/usr"),
        ("/proc", "/proc"),
        ("/dev/x", "/dev"),
        ("/tmp/x", "/tmp"),
        ("/work", "/work"),
        ("/etc", "/etc"),
        ("/usr", "/usr"),
        ("/dev/shm", "/dev/shm"),
        ("/.proc", "/.proc"),
    ],
)
async def test_a_target_over_the_sandboxs_own_paths_is_refused_at_start(host_dirs, target, clash):
    data, _ = host_dirs
    with pytest.raises(MountError) as info:
        async with Sandbox(tenants={"etl": Policy(mounts=[{"source": str(data), "target": target}])}, workers=1):
            pass
    error = info.value
    assert (error.tenant, error.field, error.path) == ("etl", "mounts[0].target", target)
    assert f"tenant 'etl': mounts[0].target {target!r} covers or lies inside {clash!r}" in str(error)


async def test_a_missing_source_is_refused_at_start_naming_tenant_field_and_path(host_dirs):
    data, _ = host_dirs
    missing = str(data / "gone")
    mounts = [{"source": str(data), "target": "/data"}, {"source": missing, "target": "/models"}]
    with pytest.raises(MountError) as info:
        async with Sandbox(tenants={"etl": Policy(mounts=mounts)}, workers=1):
            pass
    assert (info.value.tenant, info.value.field, info.value.path) == ("etl", "mounts[1].source", missing)
    assert str(info.value) == f"tenant 'etl': mounts[1].source {missing!r} does not exist on this host"


@pytest.mark.skipif(not IS_ROOT, reason="as root, the workers' uid differs from the supervisor's")
async def test_a_source_the_workers_cannot_read_is_refused_at_start_saying_how_to_grant_it(host_dirs):
    data, output = host_dirs
    data.chmod(0o700)  # root's own: no worker uid may enter it
    with pytest.raises(MountError) as info:
        async with Sandbox(tenants={"etl": Policy(mounts=[{"source": str(data), "target": "/data"}])}, workers=1):
            pass
    assert info.value.field == "mounts[0].source"
    assert f"setfacl -R -m g:{MOUNT_GID}:rX {data}" in str(info.value)
    output.chmod(0o2750)  # the group may read, not write: refused for a writable mount
    mounts = [{"source": str(output), "target": "/output", "writable": True}]
    with pytest.raises(MountError, match="cannot be given read and write access"):
        async with Sandbox(tenants={"etl": Policy(mounts=mounts)}, workers=1):
            pass


def test_doctor_reports_the_mounts_of_a_policy_file(host_dirs, tmp_path):
    data, _ = host_dirs
    secret = data / "secret.csv"
    secret.write_text("root only")
    secret.chmod(0o600)
    policy_file = tmp_path / "p.toml"
    policy_file.write_text(
        f'[tenants.etl]\nmounts = [{{source = "{data}", target = "/data"}}, '
        '{source = "/nonexistent/x", target = "/x"}]\n'
    )
    report = subprocess.run(
        [sys.executable, "-m", "sandbox", "doctor", "--policy", str(policy_file)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert report.returncode == 1
    assert "mounts of tenant 'etl': 1 problem(s)" in report.stdout
    assert "mounts[1].source '/nonexistent/x' does not exist on this host" in report.stdout
    # Sandbox start checks each source itself; the doctor also looks below it.
    if IS_ROOT:
        assert f"note: the workers cannot read {secret} (a run that opens it gets PermissionError)" in report.stdout
        assert "file1.txt" not in report.stdout


def test_mounts_need_the_mount_namespace_and_make_it_required():
    host = HostSupport({layer: "on" for layer in LAYERS}, root=True, pid_namespace=True)
    mounts = [{"source": "/srv/data", "target": "/data"}]
    with pytest.raises(ConfinementUnavailable) as info:
        build_profile("etl", Policy(mounts=mounts, skip_layers=["mountns"]), host)
    assert info.value.layer == "mountns" and "tenant 'etl' has mounts" in str(info.value)
    profile = build_profile("etl", Policy(mounts=mounts, required_layers=["seccomp"]), host)
    assert profile.required == {"seccomp", "mountns"}
    assert profile.template["mounts"] == [("/srv/data", "/data", False)]
    assert profile.template["groups"] == [MOUNT_GID]


@pytest.mark.skipif(not IS_ROOT, reason="needs root to become uid 65534")
def test_unprivileged_the_check_is_the_supervisors_own_access(host_dirs):
    """Without root, workers are the supervisor's uid: what it cannot read, they cannot."""
    data, output = host_dirs
    data.chmod(0o700)  # root's own
    policy = Policy(mounts=[{"source": str(data), "target": "/data"}, {"source": str(output), "target": "/output"}])

    def check() -> dict:
        return {"problems": [str(p) for p in mount_problems("etl", policy, root=False)]}

    report = call_as_user(check, 65534, interpreter_paths())
    assert report.get("problems") == [
        f"tenant 'etl': mounts[0].source {str(data)!r} cannot be given read access by the workers: "
        "workers run as this supervisor's uid (65534); give that user read access to it",
        f"tenant 'etl': mounts[1].source {str(output)!r} cannot be given read access by the workers: "
        "workers run as this supervisor's uid (65534); give that user read access to it",
    ], report


def test_policy_check_prints_mounts_as_a_policy_file_writes_them(tmp_path):
    policy_file = tmp_path / "p.toml"
    policy_file.write_text('[tenants.etl]\nmounts = [{source = "/srv/out", target = "/output", writable = true}]\n')
    printed = subprocess.run(
        [sys.executable, "-m", "sandbox", "policy", "check", str(policy_file)],
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    [line] = [line for line in printed.splitlines() if line.startswith("mounts = ")]
    assert tomllib.loads(line) == {"mounts": [{"source": "/srv/out", "target": "/output", "writable": True}]}
