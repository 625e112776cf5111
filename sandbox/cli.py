"""The ``sandbox`` command line: run a file, check policies, report the host.

Owns: argument parsing and presentation for ``sandbox run`` (local, or
through a server with ``--server``), ``sandbox shell`` (the prompt itself is
``sandbox.shell``), ``sandbox doctor``, ``sandbox policy check``, ``sandbox
serve`` and ``sandbox key new``. Each command owns its own event loop
(uvloop; ``serve``'s is uvicorn's). The HTTP stack is imported only by the
commands that use it.

Must never: print anything but JSON on stdout for ``run`` (the code's own
output goes to stderr), or exit 0 when the run, the check or the probe failed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import uvloop

from sandbox import __version__
from sandbox.cgroups import CgroupParents
from sandbox.errors import SandboxError
from sandbox.files import write_files
from sandbox.layers import probe
from sandbox.mounts import mount_problems, unreadable_inside
from sandbox.policies import LAYERS, Policy, PolicyFileError, load_policies
from sandbox.profile import build_profile
from sandbox.result import Result
from sandbox.supervisor import DEFAULT_TENANT, Sandbox
from sandbox.unprivileged import call_as_user, interpreter_paths
from sandbox.zygote import Zygote

EXIT_RUN_FAILED = 1
EXIT_USAGE = 2
_UNPRIVILEGED_UID = 65534


EXIT_INTERRUPTED = 130  # what a shell reports for a command ended by SIGINT


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        command: Callable[[argparse.Namespace], int] = args.command
        return command(args)
    except _UsageError as exc:
        getattr(args, "usage", parser).error(str(exc))  # the called subcommand's usage, then exit 2
    except KeyboardInterrupt:
        # The run was cancelled and the sandbox closed on the way out; one
        # line says so instead of a traceback of the event loop.
        print("sandbox: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    return EXIT_USAGE


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sandbox", description="Run untrusted Python code nodes in confined workers.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="run a file as a code node and print its outputs as JSON")
    run.add_argument("file", type=Path)
    run.add_argument(
        "--input",
        action="append",
        default=[],
        metavar="NAME=JSON",
        help="bind NAME to a JSON value before the code runs (repeatable)",
    )
    run.add_argument("--policy", type=Path, metavar="FILE", help="TOML policy file (see policies/default.toml)")
    run.add_argument("--tenant", help="tenant of the policy file to run as (default: default, or the key's)")
    run.add_argument("--timeout", type=float, help="shorten the policy's wall-clock limit (seconds)")
    run.add_argument(
        "--server", metavar="URL", help="run through a `sandbox serve` at URL, with the key in $SANDBOX_API_KEY"
    )
    run.add_argument(
        "--file",
        action="append",
        dest="files",
        default=[],
        metavar="NAME=HOSTPATH",
        help="send the host file HOSTPATH as NAME under the run's working directory (repeatable)",
    )
    run.add_argument(
        "--out", type=Path, metavar="DIR", help="write the files the run leaves in ./out/ (Result.files) under DIR"
    )
    run.set_defaults(command=_run, usage=run)

    shell = commands.add_parser("shell", help="an interactive prompt over a session (Ctrl-D leaves)")
    shell.add_argument("--policy", type=Path, metavar="FILE", help="TOML policy file (see policies/default.toml)")
    shell.add_argument("--tenant", default=DEFAULT_TENANT, help="tenant of the policy file to run as")
    shell.set_defaults(command=_shell, usage=shell)

    serve = commands.add_parser("serve", help="serve the sandbox over HTTP (needs the 'serve' extra)")
    serve.add_argument("--policy", type=Path, metavar="FILE", help="TOML policy file with the tenants")
    serve.add_argument("--keys", type=Path, metavar="FILE", help="TOML keys file ([keys] digest -> tenant)")
    serve.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000; 0 picks one)")
    serve.add_argument("--workers", type=int, help="worker processes shared by all tenants (default: CPUs)")
    serve.add_argument(
        "--insecure-no-auth",
        action="store_true",
        help="serve without API keys: every request is the default tenant, and only loopback is served",
    )
    serve.add_argument(
        "--max-body-bytes", type=int, default=16 * 1024 * 1024, help="larger bodies get 413 (default 16 MiB)"
    )
    serve.add_argument(
        "--drain-timeout", type=float, default=30.0, help="on SIGTERM, wait this long for runs in flight (s)"
    )
    metrics = serve.add_mutually_exclusive_group()
    metrics.add_argument("--no-metrics", action="store_true", help="do not serve /metrics")
    metrics.add_argument("--metrics-port", type=int, help="serve /metrics on this port instead of the API port")
    serve.add_argument(
        "--record-keep", type=float, default=600.0, help="keep a polled run's result this long (s, default 600)"
    )
    serve.set_defaults(command=_serve, usage=serve)

    key = commands.add_parser("key", help="manage API keys of `sandbox serve`")
    key_commands = key.add_subparsers(required=True, metavar="ACTION")
    new_key = key_commands.add_parser("new", help="print a new key, then the line to add under [keys]")
    new_key.add_argument("tenant")
    new_key.set_defaults(command=_key_new, usage=new_key)

    doctor = commands.add_parser("doctor", help="report which isolation layers this host provides")
    doctor.add_argument("--json", action="store_true", help="print the report as JSON")
    doctor.add_argument(
        "--policy", type=Path, metavar="FILE", help="also check the mounts of this policy file's tenants"
    )
    doctor.set_defaults(command=_doctor, usage=doctor)

    policy = commands.add_parser("policy", help="work with policy files")
    policy_commands = policy.add_subparsers(required=True, metavar="ACTION")
    check = policy_commands.add_parser("check", help="validate a policy file or directory")
    check.add_argument("path", type=Path)
    check.set_defaults(command=_policy_check, usage=check)
    return parser


class _UsageError(Exception):
    pass


# --- sandbox run -----------------------------------------------------------------


def _run(args: argparse.Namespace) -> int:
    try:
        code = args.file.read_text()
    except OSError as exc:
        raise _UsageError(f"cannot read {args.file}: {exc.strerror}") from None
    inputs = dict(_parse_input(item) for item in args.input)
    files = dict(_read_file_argument(item) for item in args.files)
    if args.server is not None:
        if args.policy is not None:
            raise _UsageError("--policy applies to a local run; the server's own policy file governs --server")
        execute = _remote_run(args.server, code, inputs, args.tenant, args.timeout, str(args.file), files)
    else:
        tenant = args.tenant or DEFAULT_TENANT
        execute = _local_run(_tenants(args), code, inputs, tenant, args.timeout, str(args.file), files)
    try:
        result = uvloop.run(execute)
    except SandboxError as exc:
        sys.stderr.write(exc.stdout + exc.stderr)
        print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_RUN_FAILED
    sys.stderr.write(result.stdout + result.stderr)
    print(json.dumps(_jsonable(result.outputs), indent=2))
    for path, reason in result.skipped_files.items():
        print(f"out/{path}: not returned: {reason}", file=sys.stderr)
    if result.files and args.out is None:
        print(f"{len(result.files)} file(s) in ./out/ not written: pass --out DIR to keep them", file=sys.stderr)
    if result.files and args.out is not None:
        refused = write_files(args.out, result.files)
        for path, reason in refused.items():
            print(f"refused to write {path!r} under {args.out}: {reason}", file=sys.stderr)
        if refused:
            return EXIT_RUN_FAILED
    return 0


def _read_file_argument(item: str) -> tuple[str, bytes]:
    name, sep, host_path = item.partition("=")
    if not sep or not name or not host_path:
        raise _UsageError(f"--file {item!r}: expected NAME=HOSTPATH")
    try:
        return name, Path(host_path).read_bytes()
    except OSError as exc:
        raise _UsageError(f"--file {name}: cannot read {host_path}: {exc.strerror}") from None


def _unknown_tenant(tenant: str, policy_file: Path | None, tenants: dict[str, Policy]) -> str:
    known = ", ".join(repr(name) for name in sorted({DEFAULT_TENANT, *tenants}))
    where = f"{policy_file} defines" if policy_file else "without --policy there is only the built-in default:"
    return f"unknown tenant {tenant!r}: {where} {known}; --policy FILE loads more tenants"


def _tenants(args: argparse.Namespace) -> dict[str, Policy]:
    tenants = _load(args.policy) if args.policy else {}
    tenant = args.tenant or DEFAULT_TENANT
    if tenant != DEFAULT_TENANT and tenant not in tenants:
        raise _UsageError(_unknown_tenant(tenant, args.policy, tenants))
    return tenants


# --- sandbox shell -----------------------------------------------------------------


def _shell(args: argparse.Namespace) -> int:
    from sandbox.shell import Shell

    return Shell(_tenants(args), args.tenant).interact()


async def _local_run(
    tenants: dict[str, Policy],
    code: str,
    inputs: dict[str, object],
    tenant: str,
    timeout: float | None,
    filename: str,
    files: dict[str, bytes],
) -> Result:
    async with Sandbox(tenants=tenants, workers=1) as sandbox:
        return await sandbox.run(code, inputs, tenant=tenant, timeout=timeout, filename=filename, files=files)


async def _remote_run(
    server: str,
    code: str,
    inputs: dict[str, object],
    tenant: str | None,
    timeout: float | None,
    filename: str,
    files: dict[str, bytes],
) -> Result:
    from sandbox.client import Client

    async with Client(server, os.environ.get("SANDBOX_API_KEY")) as client:
        return await client.run(code, inputs, tenant=tenant, timeout=timeout, filename=filename, files=files)


def _parse_input(item: str) -> tuple[str, object]:
    name, sep, text = item.partition("=")
    if not sep:
        raise _UsageError(f"--input {item!r}: expected NAME=JSON")
    try:
        return name, json.loads(text)
    except json.JSONDecodeError as exc:
        raise _UsageError(
            f"--input {name}: not valid JSON ({exc.msg}); quote strings, e.g. {name}='\"text\"'"
        ) from None


def _jsonable(value: object) -> object:
    """JSON-ready copy of a value; whatever JSON cannot hold becomes its repr."""
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(item) for item in value]
    if isinstance(value, dict) and all(isinstance(key, str) for key in value):
        return {key: _jsonable(item) for key, item in value.items()}
    return repr(value)


def _load(path: Path) -> dict[str, Policy]:
    try:
        return load_policies(path)
    except PolicyFileError as exc:
        raise _UsageError(str(exc)) from None


# --- sandbox serve, sandbox key new ----------------------------------------------------


def _serve(args: argparse.Namespace) -> int:
    try:
        from sandbox.service.app import ServiceConfig
        from sandbox.service.keys import Keys, KeysFileError
        from sandbox.service.main import is_loopback, serve
    except ImportError as exc:
        hint = "pip install 'pysandbox-nodes[serve]'"
        raise _UsageError(f"sandbox serve needs the 'serve' extra: {hint} ({exc})") from None
    tenants = _load(args.policy) if args.policy else {}
    host = args.host or "127.0.0.1"
    if args.insecure_no_auth:
        if args.keys is not None:
            raise _UsageError("--keys and --insecure-no-auth contradict each other; choose one")
        if not is_loopback(host):
            raise _UsageError(f"--insecure-no-auth serves loopback only; {host} is not a loopback address")
        keys = None
    elif args.keys is None:
        raise _UsageError(
            "sandbox serve needs --keys FILE (make keys with `sandbox key new TENANT`), or --insecure-no-auth "
            "to serve loopback without authentication"
        )
    else:
        try:
            keys = Keys.load(args.keys, set(tenants) | {DEFAULT_TENANT})
        except KeysFileError as exc:
            raise _UsageError(str(exc)) from None
    config = ServiceConfig(
        tenants=tenants,
        keys=keys,
        workers=args.workers,
        max_body_bytes=args.max_body_bytes,
        drain_timeout_s=args.drain_timeout,
        metrics=not args.no_metrics and args.metrics_port is None,
        record_keep_s=args.record_keep,
    )
    return serve(config, host, args.port, metrics_port=args.metrics_port)


def _key_new(args: argparse.Namespace) -> int:
    from sandbox.service.keys import keys_line, new_key

    key = new_key()
    print(key)
    print(keys_line(key, args.tenant))
    return 0


# --- sandbox policy check ------------------------------------------------------------


def _policy_check(args: argparse.Namespace) -> int:
    try:
        policies = load_policies(args.path)
    except PolicyFileError as exc:
        print(exc, file=sys.stderr)
        return EXIT_RUN_FAILED
    for tenant, policy in policies.items():
        print(f"[tenants.{tenant}]")
        for name, value in policy.model_dump().items():
            print(f"{name} = {_toml_value(value)}")
        print()
    print(f"OK: {len(policies)} tenant(s) in {args.path}")
    return 0


def _toml_value(value: object) -> str:
    """A value as a policy file writes it: JSON for scalars and lists, inline tables for mounts."""
    if isinstance(value, dict):
        return "{" + ", ".join(f"{key} = {_toml_value(item)}" for key, item in value.items()) + "}"
    if isinstance(value, list) and any(isinstance(item, dict) for item in value):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    return json.dumps(value)


# --- sandbox doctor --------------------------------------------------------------------


def _doctor(args: argparse.Namespace) -> int:
    # Fork the unprivileged probe first, while this process has no threads.
    unprivileged = _probe_unprivileged() if os.geteuid() == 0 else None
    report = uvloop.run(_probe_here())
    tenants = _load(args.policy) if args.policy else {}
    report["mounts"] = _mount_report(tenants)
    root = os.geteuid() == 0
    report["unreadable_inside"] = {
        name: found for name, policy in tenants.items() if (found := unreadable_inside(policy, root))
    }
    failed = report["error"] is not None or any(report["mounts"].values())
    if args.json:
        print(json.dumps(report))
        return EXIT_RUN_FAILED if failed else 0
    columns = {f"this host ({report['identity']})": report}
    if unprivileged is not None:
        columns[f"unprivileged (uid {_UNPRIVILEGED_UID})"] = unprivileged
    _print_doctor(columns, report)
    for tenant, problems in report["mounts"].items():
        print(f"\nmounts of tenant {tenant!r}: " + ("ok" if not problems else f"{len(problems)} problem(s)"))
        for problem in problems:
            print(f"   {problem}")
        for path in report["unreadable_inside"].get(tenant, []):
            print(f"   note: the workers cannot read {path} (a run that opens it gets PermissionError)")
    return EXIT_RUN_FAILED if failed else 0


def _mount_report(tenants: dict[str, Policy]) -> dict[str, list[str]]:
    """Tenant -> what is wrong with its mounts here (the check Sandbox start makes), for tenants with mounts."""
    root = os.geteuid() == 0
    return {
        name: [str(problem) for problem in mount_problems(name, policy, root)]
        for name, policy in tenants.items()
        if policy.mounts
    }


async def _probe_here() -> dict[str, Any]:
    identity = "root" if os.geteuid() == 0 else f"uid {os.geteuid()}"
    cgroups, cgroup_error = None, None
    try:
        cgroups = CgroupParents.create()
    except OSError as exc:
        cgroup_error = exc.strerror or str(exc)
    try:
        zygote = await Zygote.start(preload=[], cgroups=cgroups)
        try:
            host = await probe(zygote, cgroups, cgroup_error, egress=True)
        finally:
            await zygote.close()
    except Exception as exc:
        return {"identity": identity, "layers": {}, "default_policy": {}, "error": f"{type(exc).__name__}: {exc}"}
    finally:
        if cgroups is not None:
            cgroups.remove()
    profile = build_profile(DEFAULT_TENANT, Policy(), host)
    return {
        "identity": identity,
        "layers": host.layers,
        "egress": host.egress,
        "default_policy": {layer: ("required" if layer in profile.required else "not used") for layer in LAYERS},
        "error": None,
    }


def _probe_unprivileged() -> dict[str, Any]:
    """The same probe, run by a child that dropped to an unprivileged uid."""
    report = call_as_user(lambda: uvloop.run(_probe_here()), _UNPRIVILEGED_UID, interpreter_paths())
    report.setdefault("identity", f"uid {_UNPRIVILEGED_UID}")
    report.setdefault("layers", {})
    report.setdefault("default_policy", {})
    report.setdefault("egress", "?")
    return report


def _print_doctor(columns: dict[str, dict[str, Any]], here: dict[str, Any]) -> None:
    width = max(len(layer) for layer in (*LAYERS, "egress")) + 2
    for title, report in columns.items():
        print(f"== {title}")
        if report.get("remounted_for_reachability"):
            print(
                f"   (probed in a private mount namespace where {', '.join(report['remounted_for_reachability'])} "
                f"is traversable, so that this interpreter can run)"
            )
        if report.get("error") is not None:
            print(f"   probe failed: {report['error']}")
            continue
        for layer in LAYERS:
            print(
                f"   {layer:<{width}}{report['layers'].get(layer, '?'):<60} "
                f"default policy: {report['default_policy'].get(layer, '?')}"
            )
        print(f"   {'egress':<{width}}{report.get('egress', '?'):<60} used by policies with egress entries")
    if here["error"] is None:
        print("\nThe default policy requires every layer marked 'on' above (required_layers = \"auto\");")
        print("a policy listing a layer that is off is refused with ConfinementUnavailable.")
