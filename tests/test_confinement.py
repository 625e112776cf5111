"""What each OS layer looks like from inside a worker, for code that already holds `os`."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import textwrap

import pytest
import pytest_asyncio

from sandbox import Policy, Sandbox
from sandbox.profile import native_thread_env
from tests.conftest import IS_ROOT, quick_policy

pytestmark = pytest.mark.asyncio(loop_scope="module")

# The policy layer lets these tests import os directly; the OS layers are what is under test.
OPEN = {
    "allowed_modules": ["os", "os.path", "socket", "subprocess", "asyncio", "time", "signal", "resource", "sys"],
    "denied_modules": [],
}


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def sb():
    os.environ["SANDBOX_TEST_PASSED"] = "visible"
    os.environ["SANDBOX_TEST_HIDDEN"] = "secret"
    tenants = {
        "default": quick_policy(**OPEN, env=["SANDBOX_TEST_PASSED"]),
        "procs": quick_policy(**OPEN, allow_processes=True, max_processes=8),
        "net": quick_policy(**OPEN, network=True),
        "frozen": quick_policy(**OPEN, filesystem="readonly"),
    }
    async with Sandbox(tenants=tenants, workers=2) as sandbox:
        yield sandbox


async def test_every_layer_this_host_supports_is_on(sb):
    assert sb.host.layers["seccomp"] == "on" and sb.host.layers["mountns"] == "on"
    if IS_ROOT:
        assert all(state == "on" for state in sb.host.layers.values()), sb.host.layers


async def test_the_file_system_view_is_minimal_and_read_only(sb):
    code = textwrap.dedent("""
        import os
        root = sorted(os.listdir("/"))
        homes = sorted(os.listdir("/root")) if os.path.isdir("/root") else []
        cwd = os.getcwd()
        etc = sorted(os.listdir("/etc"))
        shadow_visible = os.path.exists("/etc/shadow")
        def writable(path):
            try:
                with open(path, "w") as f:
                    f.write("x")
                return True
            except OSError:
                return False
        wrote = {p: writable(p) for p in ("/work/a", "/tmp/a", "/dev/shm/a", "/etc/a", "/usr/a", "/a", "/proc/a")}
        procs = sorted(int(p) for p in os.listdir("/proc") if p.isdigit())
        uid = os.getuid()
    """)
    r = await sb.run(code)
    out = r.outputs
    assert out["cwd"] == "/work" and not out["shadow_visible"]
    assert "home" not in out["root"] and "var" not in out["root"] and "srv" not in out["root"]
    assert out["homes"] in ([], [".pyenv"])  # only the directories holding this interpreter, if any
    assert set(out["etc"]) <= {
        "ld.so.cache",
        "localtime",
        "nsswitch.conf",
        "hosts",
        "mime.types",
        "passwd",
        "group",
        "hostname",
    }
    assert out["wrote"] == {
        "/work/a": True,
        "/tmp/a": True,
        "/dev/shm/a": True,
        "/etc/a": False,
        "/usr/a": False,
        "/a": False,
        "/proc/a": False,
    }
    assert out["procs"] == [1, 2]  # its own init and itself
    if IS_ROOT:
        assert out["uid"] >= 1_600_000_000


async def test_readonly_filesystem_mode_makes_scratch_read_only_too(sb):
    r = await sb.run(
        "try:\n    open('/work/x', 'w')\n    ok = True\nexcept OSError as e:\n    ok = e.errno", tenant="frozen"
    )
    assert r.outputs["ok"] == 30  # EROFS


async def test_the_environment_holds_only_the_base_and_allowlisted_variables(sb):
    code = textwrap.dedent("""
        import os
        env = dict(os.environ)
        try:
            raw = open("/proc/self/environ", "rb").read()  # what the process was started with
        except PermissionError:
            raw = b""  # as root the worker runs as a uid of its own and is not dumpable
    """)
    r = await sb.run(code)
    assert r.outputs["env"] == {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": "/work",
        "TMPDIR": "/tmp",
        "LANG": "C.UTF-8",
        **native_thread_env(Policy().max_threads),
        "SANDBOX_TEST_PASSED": "visible",
    }
    assert b"secret" not in r.outputs["raw"] and b"SANDBOX_TEST" not in r.outputs["raw"]


async def test_no_network_without_the_policy(sb):
    code = textwrap.dedent("""
        import socket
        errors, kernel_errors = [], []
        for family in (socket.AF_INET, socket.AF_INET6, socket.AF_PACKET, socket.AF_NETLINK):
            kind = socket.SOCK_DGRAM if family == socket.AF_INET6 else socket.SOCK_STREAM
            try:
                socket.socket(family, kind)
                errors.append(None)
            except OSError as e:
                errors.append(e.errno)
            try:
                socket._socket.socket(family, kind)  # past the socket module's rewording, straight to the kernel
                kernel_errors.append(None)
            except OSError as e:
                kernel_errors.append(e.errno)
        a, b = socket.socketpair()
        a.send(b"ok")
        unix_ok = b.recv(2) == b"ok"
    """)
    r = await sb.run(code)
    assert r.outputs["kernel_errors"] == [97, 97, 97, 97]  # EAFNOSUPPORT from seccomp
    assert r.outputs["errors"] == [13, 13, 13, 13]  # the same refusal, reworded to name the policy
    assert r.outputs["unix_ok"] is True


async def test_network_policy_reaches_a_host_listener(sb):
    listener = socket.create_server(("127.0.0.1", 0))
    listener.setblocking(False)
    port = listener.getsockname()[1]
    try:
        r = await sb.run(
            "import socket\ns = socket.create_connection(('127.0.0.1', port), timeout=2)\nok = True",
            {"port": port},
            tenant="net",
        )
        assert r.outputs == {"ok": True}
        conn, _ = listener.accept()
        conn.close()
    finally:
        listener.close()


async def test_processes_are_refused_by_default(sb):
    code = textwrap.dedent("""
        import os, subprocess
        results = {}
        for name, action in (("fork", os.fork), ("spawn", lambda: subprocess.run(["/bin/true"]))):
            try:
                action()
                results[name] = "allowed"
            except OSError as e:
                results[name] = e.errno
    """)
    r = await sb.run(code)
    assert r.outputs["results"] == {"fork": 1, "spawn": 1}


async def test_allowed_processes_run_and_do_not_outlive_their_run(sb):
    code = textwrap.dedent("""
        import subprocess
        echoed = subprocess.run(["/bin/echo", "hi"], capture_output=True, text=True).stdout
        daemon = subprocess.Popen(["/bin/sleep", "60"], start_new_session=True).pid
    """)
    r = await sb.run(code, tenant="procs")
    assert r.outputs["echoed"] == "hi\n"
    follow = await sb.run(
        "import os\nprocs = sorted(int(p) for p in os.listdir('/proc') if p.isdigit())", tenant="procs"
    )
    assert follow.stats.worker_pid == r.stats.worker_pid
    assert follow.outputs["procs"] == [1, 2]


async def test_kill_and_prlimit_reach_only_the_worker_itself(sb):
    code = textwrap.dedent("""
        import os, resource
        errors = {}
        for name, call in (("kill_init", lambda: os.kill(1, 0)), ("kill_other", lambda: os.kill(3, 0)),
                           ("kill_all", lambda: os.kill(-1, 0)),
                           ("prlimit_other", lambda: resource.prlimit(1, resource.RLIMIT_NOFILE)),
                           ("lower_own", lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (16, 16))),
                           ("lower_own_prlimit", lambda: resource.prlimit(0, resource.RLIMIT_CPU, (1, 1)))):
            try:
                call()
                errors[name] = None
            except OSError as e:
                errors[name] = e.errno
            except ValueError as e:  # how setrlimit() reports EPERM
                errors[name] = str(e)
        own = resource.prlimit(0, resource.RLIMIT_NOFILE)
    """)
    r = await sb.run(code)
    assert r.outputs["errors"]["kill_other"] == 1 and r.outputs["errors"]["kill_all"] == 1
    assert r.outputs["errors"]["prlimit_other"] == 1
    assert r.outputs["errors"]["lower_own"] == "not allowed to raise maximum limit"  # seccomp's EPERM
    assert r.outputs["errors"]["lower_own_prlimit"] == 1
    assert tuple(r.outputs["own"]) == (64, 64)


async def test_without_seccomp_a_worker_whose_rlimits_were_lowered_is_not_reused():
    policy = quick_policy(**OPEN, skip_layers=["seccomp"])
    async with Sandbox(policy, workers=1) as sandbox:
        lowered = await sandbox.run("import resource\nresource.setrlimit(resource.RLIMIT_NOFILE, (16, 16))")
        untouched = await sandbox.run("x = 1")
        after = await sandbox.run("import resource\nnofile = resource.getrlimit(resource.RLIMIT_NOFILE)")
    assert lowered.stats.worker_pid != untouched.stats.worker_pid
    assert untouched.stats.worker_pid == after.stats.worker_pid
    assert tuple(after.outputs["nofile"]) == (64, 64)


async def test_workers_run_at_a_lower_cpu_priority_they_cannot_raise(sb):
    code = textwrap.dedent("""
        import os
        nice = os.getpriority(os.PRIO_PROCESS, 0)
        try:
            os.setpriority(os.PRIO_PROCESS, 0, 0)
            raised = True
        except PermissionError:
            raised = False
    """)
    r = await sb.run(code)
    assert r.outputs == {"nice": 10, "raised": False}
    assert os.getpriority(os.PRIO_PROCESS, 0) == 0


async def test_a_niced_supervisor_gets_workers_below_itself_not_an_error():
    # A supervisor at nice 15 (a job scheduler's, or a Ray worker's) must not
    # have its workers ask for nice 10, a higher priority than its own.
    script = textwrap.dedent("""
        import asyncio, os
        from sandbox import Policy, Sandbox
        CODE = "import os\\nnice = os.getpriority(os.PRIO_PROCESS, 0)"
        async def main():
            async with Sandbox(Policy(allowed_modules=["os"], denied_modules=[]), workers=1) as sb:
                r = await sb.run(CODE)
                print(os.getpriority(os.PRIO_PROCESS, 0), r.outputs["nice"])
        asyncio.run(main())
    """)
    command = ["nice", "-n", "15", sys.executable, "-c", script]
    done = await asyncio.to_thread(subprocess.run, command, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["15", "19"]


async def test_rlimits_match_the_policy(sb):
    code = textwrap.dedent("""
        import resource
        limits = {name: resource.getrlimit(getattr(resource, name)) for name in
                  ("RLIMIT_DATA", "RLIMIT_NOFILE", "RLIMIT_FSIZE", "RLIMIT_CORE", "RLIMIT_STACK")}
    """)
    r = await sb.run(code)
    mib = 1024 * 1024
    assert r.outputs["limits"] == {
        "RLIMIT_DATA": (256 * mib, 256 * mib),
        "RLIMIT_NOFILE": (64, 64),
        "RLIMIT_FSIZE": (16 * mib, 16 * mib),
        "RLIMIT_CORE": (0, 0),
        "RLIMIT_STACK": (8 * mib, 8 * mib),
    }


async def test_no_privilege_can_be_regained(sb):
    code = textwrap.dedent("""
        status = dict(line.split(":", 1) for line in open("/proc/self/status").read().splitlines())
        caps = {k: int(status[k].strip(), 16) for k in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")}
        no_new_privs = status["NoNewPrivs"].strip()
        seccomp = status["Seccomp"].strip()
    """)
    r = await sb.run(code)
    assert r.outputs["caps"] == {"CapInh": 0, "CapPrm": 0, "CapEff": 0, "CapBnd": 0, "CapAmb": 0}
    assert r.outputs["no_new_privs"] == "1" and r.outputs["seccomp"] == "2"


async def test_without_a_mount_namespace_the_scratch_is_a_private_host_directory():
    bare = quick_policy(**OPEN, skip_layers=["mountns", "landlock"])
    async with Sandbox(bare, workers=1) as sandbox:
        first = await sandbox.run(
            "import os\ncwd = os.getcwd()\nopen('note.txt', 'w').write('x')\ntmp_listing_ok = bool(os.listdir('/tmp'))"
        )
        cwd = first.outputs["cwd"]
        assert cwd.startswith("/tmp/sandbox-w") and os.path.isdir(cwd)
        second = await sandbox.run("import os\nleft = os.listdir('.')\nout = os.listdir('out')")
        assert second.outputs["left"] == ["out"] and second.outputs["out"] == []  # ./out/, made again, empty
        assert first.stats.worker_pid == second.stats.worker_pid
    deadline = asyncio.get_running_loop().time() + 3
    while os.path.exists(cwd) and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.05)
    assert not os.path.exists(cwd)
