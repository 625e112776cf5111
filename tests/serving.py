"""A real ``sandbox serve`` subprocess on 127.0.0.1 and a port of its own, for the service tests."""

from __future__ import annotations

import os
import re
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

from sandbox.service.keys import digest, new_key

POLICY = """
[base]
wall_time_s = 5
cpu_time_s = 3

[tenants.default]

[tenants.other]
max_sessions = 1

[tenants.limited]
rate_per_s = 0.01
burst = 1
"""
TENANTS = ("default", "other", "limited")
_LISTENING = re.compile(r"listening on (http://\S+)")


@dataclass
class Server:
    url: str
    keys: dict[str, str]  # tenant -> API key
    process: subprocess.Popen
    log: Path

    def headers(self, tenant: str = "default") -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys[tenant]}"}


def write_files(directory: Path) -> tuple[Path, Path, dict[str, str]]:
    keys = {tenant: new_key() for tenant in TENANTS}
    policy = directory / "tenants.toml"
    policy.write_text(POLICY)
    keys_file = directory / "keys.toml"
    keys_file.write_text("[keys]\n" + "".join(f'"{digest(k)}" = "{t}"\n' for t, k in keys.items()))
    return policy, keys_file, keys


@contextmanager
def running_server(
    directory: Path, *extra: str, timeout_s: float = 60.0, launcher: Sequence[str] = (sys.executable, "-m", "sandbox")
) -> Iterator[Server]:
    """``sandbox serve`` started by ``launcher`` (the command that stands for ``sandbox``)."""
    policy, keys_file, keys = write_files(directory)
    command = [*launcher, "serve", "--policy", str(policy), "--keys", str(keys_file)]
    command += ["--host", "127.0.0.1", "--port", "0", "--workers", "2", *extra]
    log = directory / "serve.log"
    with log.open("w") as stderr:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=stderr, text=True)
    try:
        url = wait_for_address(process, log, timeout_s)
        wait_until_ready(url, process, log, timeout_s)
        yield Server(url, keys, process, log)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def wait_for_address(process: subprocess.Popen, log: Path, timeout_s: float) -> str:
    """The URL the server prints once it listens (and its Sandbox has started)."""
    deadline = time.monotonic() + timeout_s
    assert process.stdout is not None
    while time.monotonic() < deadline:
        ready, _, _ = select.select([process.stdout], [], [], 0.5)
        if ready:
            line = process.stdout.readline()
            match = _LISTENING.search(line)
            if match:
                return match.group(1)
        if process.poll() is not None:
            raise RuntimeError(f"sandbox serve exited {process.returncode}: {log.read_text()}")
    raise RuntimeError("sandbox serve did not print its address in time")


def wait_until_ready(url: str, process: subprocess.Popen, log: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/readyz").status_code == 200:
                return
        except httpx.TransportError:
            pass
        if process.poll() is not None:
            raise RuntimeError(f"sandbox serve exited {process.returncode}: {log.read_text()}")
        time.sleep(0.1)
    raise RuntimeError("sandbox serve did not become ready in time")


def environment_with(**values: str) -> dict[str, str]:
    return {**os.environ, **values}
