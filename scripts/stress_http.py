"""The HTTP client mode of ``scripts/stress.py``: the same mix through a ``sandbox serve``.

``RemoteSandbox`` has the three things stress.py asks of a Sandbox
(``start``, ``run(code, inputs, tenant=...)``, ``close``) and sends each run
through ``sandbox.client.Client`` with the API key of its tenant, over at
most ``--concurrency`` connections. ``write_setup`` writes the policy and
keys files a server needs for the mix, and the tenant -> key file that
``--server-keys`` reads::

    python scripts/stress.py --server-setup /tmp/st --tenants 1     # prints the two commands below
    unshare --pid --fork --kill-child --mount-proc sandbox serve --policy /tmp/st/tenants.toml \\
        --keys /tmp/st/keys.toml --port 8123 &
    python scripts/stress.py --server http://127.0.0.1:8123 --server-keys /tmp/st/client-keys.json \\
        --server-pid "$(pgrep -n -f 'sandbox serve --policy /tmp/st')" --runs 10000 --concurrency 64

A reply with a 5xx status, or no reply, is an outcome of its own (the
``ServiceError`` or ``internal:`` outcomes), which no workload expects.
With ``--server-pid`` the RSS and fd figures are the server's; the loop lag
stress.py reports is its own loop's (the client's), the server's is
``sandbox_event_loop_lag_seconds`` in its ``/metrics``. The server outlives
the run, so its fds are judged from the warm baseline to the drained end,
and its workers are not counted as left behind.

Must never: retry a request (a run is submitted once and counted once).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from pathlib import Path

from sandbox.client import Client
from sandbox.policies import Policy
from sandbox.result import Result
from sandbox.service.keys import keys_line, new_key


class RemoteSandbox:
    host = None  # the server's layers are its own; `sandbox doctor` on that host shows them

    def __init__(self, url: str, keys: Mapping[str, str], connections: int) -> None:
        self._clients = {tenant: Client(url, key, connections=connections) for tenant, key in keys.items()}

    async def start(self) -> None:
        for client in self._clients.values():
            await client.__aenter__()

    async def run(self, code: str, inputs: Mapping[str, object], *, tenant: str) -> Result:
        return await self._clients[tenant].run(code, inputs)

    async def close(self) -> None:
        for client in self._clients.values():
            await client.__aexit__()


def load_keys(path: Path) -> dict[str, str]:
    return dict(json.loads(path.read_text()))


def write_setup(directory: Path, policies: Mapping[str, Policy]) -> None:
    """The server's policy and keys files for these tenants, and the client's keys; print how to use them."""
    directory.mkdir(parents=True, exist_ok=True)
    defaults = Policy().model_dump()
    lines = []
    for tenant, policy in policies.items():
        lines.append(f"[tenants.{json.dumps(tenant)}]")
        changed = {name: value for name, value in policy.model_dump().items() if value != defaults[name]}
        lines += [f"{name} = {json.dumps(value)}" for name, value in changed.items()]
        lines.append("")
    (directory / "tenants.toml").write_text("\n".join(lines))
    keys = {tenant: new_key() for tenant in policies}
    (directory / "keys.toml").write_text("[keys]\n" + "".join(keys_line(k, t) + "\n" for t, k in keys.items()))
    client_keys = directory / "client-keys.json"
    client_keys.write_text(json.dumps(keys))
    client_keys.chmod(0o600)
    print(f"sandbox serve --policy {directory / 'tenants.toml'} --keys {directory / 'keys.toml'} --port 8123")
    print(f"{sys.executable} scripts/stress.py --server http://127.0.0.1:8123 --server-keys {client_keys}")
