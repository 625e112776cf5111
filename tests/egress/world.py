"""A throwaway network world for the egress tests, and the scenarios run in it.

Run only as root, as::

    unshare --net --pid --mount --fork --kill-child --mount-proc python world.py SOURCE_ROOT

so that everything the Sandbox under test creates (namespaces, pasta
processes, nftables tables) and everything this script creates lives in a
network, PID and mount namespace that dies with it. No packet can reach any
address but this world's own: its only links are loopback and a veth to an
"upstream" namespace, forked below, which holds every address a test
connects to, each with a listener. A broken rule therefore connects to the
test's own listener, whose answer names it, and the test fails.

Upstream's addresses:

* 10.203.0.2 (the veth peer; also the world's default route);
* 198.51.100.10 and .11 (TEST-NET-2: public-looking, for names);
* 169.254.169.254 (the cloud metadata address) and 10.99.0.1 (private).

Each serves HTTP on ports 80, 8080 and 8081 answering ``upstream <addr>:<port>``,
and UDP echo on 7777 and 7778; the world's own loopback serves
``world-loopback`` on 8080, which a worker must never reach. PostgreSQL
listens on 10.203.0.2:5432 when it is installed.

Names come from this world's own ``/etc/hosts`` (bound over the real one in
the private mount namespace), so nothing ever asks real DNS.

Prints one JSON object: every observation, for ``tests/test_egress.py`` to judge.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

if __name__ == "__main__":
    sys.path.insert(0, sys.argv[1])

UPSTREAM = "10.203.0.2"
WORLD = "10.203.0.1"
UPSTREAM6, WORLD6 = "fd00:203::2", "fd00:203::1"
PUBLIC_A, PUBLIC_B = "198.51.100.10", "198.51.100.11"
METADATA, PRIVATE = "169.254.169.254", "10.99.0.1"
HTTP_PORTS = (80, 8080, 8081)
UDP_PORTS = (7777, 7778)
POSTGRES_BIN = "/usr/lib/postgresql/15/bin"
HOSTS = f"""127.0.0.1 localhost
{PUBLIC_A} api.egress.test
{PRIVATE} private.egress.test
{UPSTREAM} internal.egress.test
"""
CONNECT_TIMEOUT_S = 5.0  # generous for a loaded machine; refusals take well under a millisecond

# --- the network -------------------------------------------------------------------


class _Answer(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        host, port = self.connection.getsockname()[:2]
        body = f"{self.server.label} {host}:{port}".encode()  # type: ignore[attr-defined]
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


class _Server6(ThreadingHTTPServer):
    address_family = socket.AF_INET6


def _serve_http(address: str, port: int, label: str) -> None:
    server = (_Server6 if ":" in address else ThreadingHTTPServer)((address, port), _Answer)
    server.label = label  # type: ignore[attr-defined]
    threading.Thread(target=server.serve_forever, daemon=True).start()


def _serve_udp_echo(port: int) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("0.0.0.0", port))

    def echo() -> None:
        while True:
            data, peer = sock.recvfrom(2048)
            sock.sendto(b"echo " + data, peer)

    threading.Thread(target=echo, daemon=True).start()


def _sh(*commands: str) -> None:
    for command in commands:
        subprocess.run(command.split(), check=True)


def _start_upstream() -> int:
    """Fork the upstream namespace, wire it to this one, start its servers; its pid."""
    ready_r, ready_w = os.pipe()
    wired_r, wired_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            from sandbox.runtime import linux

            linux.set_parent_death_signal(signal.SIGKILL)
            linux.unshare(linux.CLONE_NEWNET)
            os.write(ready_w, b"x")
            os.read(wired_r, 1)
            _sh("ip link set lo up", f"ip addr add {UPSTREAM}/24 dev eg-u")
            for address in (PUBLIC_A, PUBLIC_B, METADATA, PRIVATE):
                _sh(f"ip addr add {address}/32 dev eg-u")
            _sh(f"ip -6 addr add {UPSTREAM6}/64 dev eg-u nodad", "ip link set eg-u up")
            for port in HTTP_PORTS:
                _serve_http("0.0.0.0", port, "upstream")
                _serve_http(UPSTREAM6, port, "upstream")
            for port in UDP_PORTS:
                _serve_udp_echo(port)
            postgres = _start_postgres()
            os.write(ready_w, b"p" if postgres else b"-")
            signal.pause()
        finally:
            os._exit(0)
    os.read(ready_r, 1)
    _sh("ip link set lo up", "ip link add eg-t type veth peer name eg-u", f"ip link set eg-u netns {pid}")
    _sh(f"ip addr add {WORLD}/24 dev eg-t", f"ip -6 addr add {WORLD6}/64 dev eg-t nodad", "ip link set eg-t up")
    _sh(f"ip route add default via {UPSTREAM}", f"ip -6 route add default via {UPSTREAM6}")
    os.write(wired_w, b"x")
    return pid if os.read(ready_r, 1) == b"p" else -pid


def _start_postgres() -> bool:
    """PostgreSQL on UPSTREAM:5432, trusting everyone (it lives in this world only)."""
    if not os.path.exists(f"{POSTGRES_BIN}/postgres"):
        return False
    data = tempfile.mkdtemp(prefix="egress-pg-")
    shutil.chown(data, "postgres", "postgres")
    as_postgres = ["setpriv", "--reuid=postgres", "--regid=postgres", "--clear-groups"]
    subprocess.run(
        [*as_postgres, f"{POSTGRES_BIN}/initdb", "-D", data, "-U", "postgres", "--auth=trust"],
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    with open(f"{data}/pg_hba.conf", "a") as f:
        f.write("host all all 0.0.0.0/0 trust\n")
    server = subprocess.Popen(
        [*as_postgres, f"{POSTGRES_BIN}/postgres", "-D", data, "-c", f"listen_addresses={UPSTREAM}", "-k", data],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and server.poll() is None:
        try:
            socket.create_connection((UPSTREAM, 5432), timeout=1).close()
            return True
        except OSError:
            time.sleep(0.1)
    return False


def _private_tmp() -> None:
    """A /tmp of this world's own, so that owner locks, scratch directories and
    this world's files stay in it; a checkout that lives under /tmp is bound back."""
    from sandbox.runtime import linux

    source = os.path.realpath(sys.argv[1])
    keep = os.open(source, os.O_PATH) if source.startswith("/tmp/") else None
    linux.mount("tmpfs", "/tmp", "tmpfs", 0, "mode=1777")
    if keep is not None:
        os.makedirs(source, mode=0o755)
        linux.mount(f"/proc/self/fd/{keep}", source, None, linux.MS_BIND | linux.MS_REC)
        os.close(keep)


def _private_hosts_file() -> str:
    path = tempfile.mktemp(prefix="egress-hosts-")
    with open(path, "w") as f:
        f.write(HOSTS)
    os.chmod(path, 0o644)
    subprocess.run(["mount", "--bind", path, "/etc/hosts"], check=True)
    return path


def network_state() -> dict:
    """Everything egress could leave on this world's network: links, routes, nftables, pasta processes."""
    links = sorted(line.split(":")[1].strip().split("@")[0] for line in _out("ip -o link").splitlines())
    return {
        "links": links,
        "routes": _out("ip route").splitlines(),
        "nft": _out("nft list ruleset"),
        "pasta": sorted(_pasta_processes()),
    }


def _pasta_processes() -> list[int]:
    found = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if f.read().startswith(b"sandbox-egress-"):
                    found.append(int(entry))
        except OSError:
            pass
    return found


def _out(command: str) -> str:
    return subprocess.run(command.split(), capture_output=True, text=True, check=True).stdout


# --- code run in the sandbox -------------------------------------------------------------

PROBE = """
import errno, socket, time

def attempt(family, kind, address, proto=0, payload=None):
    started = time.monotonic()
    try:
        sock = socket.socket(family, kind, proto)
    except OSError as exc:
        return {"stage": "socket", "error": errno.errorcode.get(exc.errno, str(exc)), "s": time.monotonic() - started}
    sock.settimeout(TIMEOUT)
    try:
        if address is None:
            sock.bind(("0.0.0.0", 0))
            sock.listen()
            return {"stage": "listen", "error": None}
        sock.connect(address)
        if kind == socket.SOCK_DGRAM:
            sock.send(payload or b"ping")
            answer = sock.recv(100).decode()
        else:
            sock.sendall(b"GET / HTTP/1.0\\r\\nHost: x\\r\\n\\r\\n")
            received = b""
            while chunk := sock.recv(4096):  # HTTP/1.0: the server closes after the body
                received += chunk
            answer = received.decode(errors="replace").partition("\\r\\n\\r\\n")[2]
        return {"stage": "connected", "error": None, "answer": answer, "s": time.monotonic() - started}
    except OSError as exc:
        code = errno.errorcode.get(exc.errno, type(exc).__name__) if exc.errno else type(exc).__name__
        return {"stage": "connect", "error": code, "s": time.monotonic() - started}
    finally:
        sock.close()

results = {}
for label, (host, port) in TCP.items():
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    results[label] = attempt(family, socket.SOCK_STREAM, (host, port))
for label, (host, port) in UDP.items():
    results[label] = attempt(socket.AF_INET, socket.SOCK_DGRAM, (host, port))
results["raw"] = attempt(socket.AF_INET, socket.SOCK_RAW, ("10.203.0.2", 0), socket.IPPROTO_ICMP)
results["netlink"] = attempt(socket.AF_NETLINK, socket.SOCK_RAW, (0, 0))
results["packet"] = attempt(socket.AF_PACKET, socket.SOCK_RAW, ("eg-t", 0))
results["listen"] = attempt(socket.AF_INET, socket.SOCK_STREAM, None)
resolved = {}
for name in NAMES:
    try:
        resolved[name] = sorted({i[4][0] for i in socket.getaddrinfo(name, 8080)})
    except OSError as exc:
        resolved[name] = type(exc).__name__
hosts = open("/etc/hosts").read()
with open("/proc/self/status") as status:
    capabilities = {k: int(v, 16) for k, _, v in (line.partition(":") for line in status) if k.startswith("Cap")}
"""

TCP_TARGETS = {
    "allowed": (UPSTREAM, 8080),
    "other_port": (UPSTREAM, 8081),
    "loopback": ("127.0.0.1", 8080),
    "world": (WORLD, 8080),
    "metadata": (METADATA, 80),
    "private": (PRIVATE, 8080),
    "public_b": (PUBLIC_B, 8080),
    "ipv6_loopback": ("::1", 8080),
    "ipv6": ("fd00::2", 8080),
    "ipv6_allowed": (UPSTREAM6, 8080),
    "ipv6_other_port": (UPSTREAM6, 8081),
}
UDP_TARGETS = {"udp_allowed": (UPSTREAM, 7777), "udp_other_port": (UPSTREAM, 7778)}
NAMES = ["api.egress.test", "private.egress.test", "internal.egress.test"]

AIOHTTP_GET = """
import aiohttp

async with aiohttp.ClientSession() as session:
    async with session.get(url) as response:
        status = response.status
        body = await response.text()
"""

ASYNCPG_QUERY = """
import asyncpg

connection = await asyncpg.connect(host="10.203.0.2", port=5432, user="postgres", database="postgres")
answer = await connection.fetchval("SELECT 40 + 2")
await connection.close()
"""

EGRESS = [
    f"{UPSTREAM}:8080",
    f"[{UPSTREAM6}]:8080",
    "api.egress.test:8080",
    "private.egress.test:8080",
    "internal.egress.test:8080",
    f"{UPSTREAM}:5432",
    f"udp:{UPSTREAM}:7777",
]


def tenant(**overrides: object) -> object:
    from sandbox.policies import DEFAULT_ALLOWED_MODULES, DEFAULT_DENIED_MODULES, Policy

    values: dict = {
        "allowed_modules": [*DEFAULT_ALLOWED_MODULES, "socket", "errno", "aiohttp.*", "asyncpg.*"],
        "denied_modules": [m for m in DEFAULT_DENIED_MODULES if m not in ("socket", "_socket")],
        "memory_mb": 512,
        "wall_time_s": 20,
        "cpu_time_s": 10,
        "max_memory_growth_mb": 512,  # importing aiohttp and asyncpg must not recycle the worker
    }
    values.update(overrides)
    return Policy(**values)


def probe_code(tcp: dict, udp: dict) -> str:
    header = f"TCP = {tcp!r}\nUDP = {udp!r}\nNAMES = {NAMES!r}\nTIMEOUT = {CONNECT_TIMEOUT_S}\n"
    return header + PROBE


# --- scenarios ---------------------------------------------------------------------------------


async def main_scenario(report: dict, hosts_path: str) -> None:
    from sandbox import Sandbox
    from sandbox.errors import SandboxError

    tenants = {"egress": tenant(egress=EGRESS), "none": tenant()}
    started = time.monotonic()
    # One worker: the two egress probes follow each other on the same worker,
    # which is what shows that its names stay pinned.
    async with Sandbox(tenants=tenants, workers=1) as sandbox:
        report["start_s"] = time.monotonic() - started
        report["host_egress"] = sandbox.host.egress if sandbox.host else None
        report["network_during"] = network_state()
        for name in ("none", "egress"):
            result = await sandbox.run(probe_code(TCP_TARGETS, UDP_TARGETS), tenant=name)
            report[f"probe_{name}"] = {k: result.outputs[k] for k in ("results", "resolved", "hosts", "capabilities")}
            report[f"probe_{name}"]["worker_pid"] = result.stats.worker_pid
        # Re-point the name on the host: the running worker keeps what was pinned for it.
        with open(hosts_path, "w") as f:
            f.write(HOSTS.replace(PUBLIC_A, PUBLIC_B))
        result = await sandbox.run(probe_code({"api": ("api.egress.test", 8080)}, {}), tenant="egress")
        report["after_repoint"] = {
            "api": result.outputs["results"]["api"],
            "resolved": result.outputs["resolved"]["api.egress.test"],
            "worker_pid": result.stats.worker_pid,
        }
        with open(hosts_path, "w") as f:
            f.write(HOSTS)
        for label, url in (
            ("aiohttp", "http://api.egress.test:8080/"),
            ("aiohttp_other_port", f"http://{UPSTREAM}:8081/"),
        ):
            try:
                result = await sandbox.run(AIOHTTP_GET, {"url": url}, tenant="egress")
                report[label] = {"status": result.outputs["status"], "body": result.outputs["body"]}
            except SandboxError as exc:
                report[label] = {"error": f"{type(exc).__name__}: {exc}"}
        try:
            result = await sandbox.run(ASYNCPG_QUERY, tenant="egress")
            report["asyncpg"] = {"answer": result.outputs["answer"]}
        except SandboxError as exc:
            report["asyncpg"] = {"error": f"{type(exc).__name__}: {exc}"}
    report["network_after_close"] = network_state()
    # A new worker (here, of a new Sandbox) resolves again.
    with open(hosts_path, "w") as f:
        f.write(HOSTS.replace(PUBLIC_A, PUBLIC_B))
    async with Sandbox(tenants={"egress": tenant(egress=EGRESS)}, workers=1) as sandbox:
        result = await sandbox.run(probe_code({"api": ("api.egress.test", 8080)}, {}), tenant="egress")
        report["new_worker"] = {
            "api": result.outputs["results"]["api"],
            "resolved": result.outputs["resolved"]["api.egress.test"],
        }
    with open(hosts_path, "w") as f:
        f.write(HOSTS)


SUPERVISOR_TO_KILL = """
import sys, os, asyncio
sys.path.insert(0, sys.argv[1])
sys.path.insert(0, os.path.dirname(sys.argv[2]))
import uvloop
from world import EGRESS, tenant, _pasta_processes
from sandbox import Sandbox

async def main():
    async with Sandbox(tenants={"egress": tenant(egress=EGRESS)}, workers=2) as sandbox:
        await sandbox.run("x = 1", tenant="egress")
        print(" ".join(map(str, _pasta_processes())), flush=True)
        await asyncio.sleep(600)

uvloop.run(main())
"""


def killed_supervisor_scenario(report: dict) -> None:
    """SIGKILL a supervisor with egress workers: nothing of theirs may remain."""
    supervisor = subprocess.Popen(
        [sys.executable, "-c", SUPERVISOR_TO_KILL, sys.argv[1], os.path.abspath(__file__)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert supervisor.stdout is not None
    report["pasta_before_kill"] = [int(p) for p in supervisor.stdout.readline().split()]
    supervisor.kill()
    supervisor.wait()
    deadline = time.monotonic() + 5
    while _pasta_processes() and time.monotonic() < deadline:
        time.sleep(0.05)
    report["network_after_kill"] = network_state()


def leftover_scenario(report: dict) -> None:
    """A pasta carrying a dead owner's tag (as if its PID namespace had not ended
    it) is removed by the leftovers sweep; one carrying a live owner's tag is kept."""
    from sandbox import egress, leftovers

    dead_owner = secrets.token_hex(4)
    open(leftovers.lock_path(dead_owner), "w").close()  # a lock file nobody holds: its owner is gone
    holders = [subprocess.Popen(["unshare", "--net", "sleep", "60"]) for _ in range(2)]
    time.sleep(0.2)
    strays = {}
    for owner, holder in zip((dead_owner, leftovers.owner_tag()), holders, strict=True):
        strays[owner] = subprocess.Popen(
            [
                "bash",
                "-c",
                f"exec -a sandbox-egress-{owner}-pasta pasta --foreground --quiet --runas 0 --no-map-gw "
                f"-t none -u none -T none -U none --netns /proc/self/fd/7 7</proc/{holder.pid}/ns/net",
            ]
        )
    time.sleep(0.5)
    report["leftovers_running"] = {owner: process.poll() is None for owner, process in strays.items()}
    assert egress.marker().startswith(f"sandbox-egress-{leftovers.owner_tag()}-")
    leftovers.sweep()
    time.sleep(0.2)
    report["leftovers_killed"] = {
        "dead_owner": strays[dead_owner].poll() is not None,
        "live_owner": strays[leftovers.owner_tag()].poll() is not None,
    }
    for process in (*strays.values(), *holders):
        process.kill()
        process.wait()


def unprivileged_scenario(report: dict, label: str) -> None:
    """The same Sandbox as uid 65534: it works, or refuses egress naming the layer."""
    import uvloop

    from sandbox.unprivileged import call_as_user, interpreter_paths

    async def attempt() -> dict:
        from sandbox import Sandbox
        from sandbox.errors import ConfinementUnavailable

        try:
            async with Sandbox(tenants={"egress": tenant(egress=EGRESS)}, workers=1) as sandbox:
                result = await sandbox.run(probe_code(TCP_TARGETS, {}), tenant="egress")
                return {"outcome": "ran", "results": result.outputs["results"]}
        except ConfinementUnavailable as exc:
            return {"outcome": "refused", "layer": exc.layer, "reason": exc.reason}

    report[label] = call_as_user(lambda: uvloop.run(attempt()), 65534, interpreter_paths())
    report[label]["tun_usable_by_65534"] = _usable_by(65534, "/dev/net/tun")


def _usable_by(uid: int, path: str) -> bool:
    st = os.stat(path)
    return bool(st.st_mode & 0o006 == 0o006 or (st.st_uid == uid and st.st_mode & 0o600 == 0o600))


def open_tun_device() -> bool:
    """In this world's mount namespace only: a /dev/net/tun that anyone may open
    (Debian's default mode), so the unprivileged path can be tried where the
    real one is root-only."""
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=0755", "tmpfs", "/dev/net"], check=True)
        os.mknod("/dev/net/tun", 0o020666, os.makedev(10, 200))
        os.chmod("/dev/net/tun", 0o666)
        open("/dev/net/tun", "rb").close()
    except OSError:
        return False
    return True


def main() -> None:
    report: dict = {}
    try:
        _private_tmp()
        hosts_path = _private_hosts_file()
        upstream = _start_upstream()
        report["postgres"] = upstream > 0
        _serve_http("0.0.0.0", 8080, "world-loopback")  # what a broken rule or mapping would reach
        report["network_before"] = network_state()
        import uvloop

        uvloop.run(main_scenario(report, hosts_path))
        doctor = subprocess.run(
            [sys.executable, "-m", "sandbox", "doctor", "--json"], capture_output=True, text=True, cwd=sys.argv[1]
        )
        report["doctor"] = json.loads(doctor.stdout or "{}")
        killed_supervisor_scenario(report)
        leftover_scenario(report)
        unprivileged_scenario(report, "unprivileged_host_tun")
        report["tun_opened"] = open_tun_device()
        if report["tun_opened"]:
            unprivileged_scenario(report, "unprivileged_open_tun")
    except BaseException:
        report["error"] = traceback.format_exc()
    print(json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
