"""The policy a tenant's runs execute under.

Owns: every knob of a run's limits and confinement, its default, and the
validation of its value.

Must never: default to anything unsafe. Every default below is what a
platform serving strangers would choose: no network, no processes, no
writable path but a size-capped scratch space, short time limits, a module
allowlist of pure-computation and async modules, and every isolation layer
this host supports required ("auto").
"""

from __future__ import annotations

import itertools
import re
from typing import Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from sandbox.policies.egress import parse_egress

Layer = Literal["rlimits", "identity", "pidns", "mountns", "netns", "ipcns", "landlock", "seccomp", "cgroup"]
LAYERS: tuple[str, ...] = get_args(Layer)
# Egress rests on these: the worker's own namespace holds the rules, its mount
# namespace the pinned /etc/hosts; seccomp keeps netlink away; the zygote's PID
# namespace ends pasta with it. A tenant with egress requires them all.
EGRESS_LAYERS: tuple[Layer, ...] = ("netns", "mountns", "pidns", "seccomp")

DEFAULT_ALLOWED_MODULES = [
    "asyncio",
    "json",
    "math",
    "cmath",
    "re",
    "datetime",
    "zoneinfo",
    "calendar",
    "time",
    "collections",
    "collections.abc",
    "itertools",
    "functools",
    "operator",
    "statistics",
    "random",
    "decimal",
    "fractions",
    "numbers",
    "typing",
    "dataclasses",
    "enum",
    "abc",
    "contextlib",
    "string",
    "textwrap",
    "difflib",
    "unicodedata",
    "pprint",
    "uuid",
    "hashlib",
    "hmac",
    "secrets",
    "base64",
    "binascii",
    "struct",
    "array",
    "copy",
    "heapq",
    "bisect",
    "csv",
    "io",
    "html",
    "warnings",
]
DEFAULT_DENIED_MODULES = [
    "os",
    "sys",
    "subprocess",
    "socket",
    "ctypes",
    "importlib",
    "pickle",
    "marshal",
    "gc",
    "inspect",
    "signal",
    "multiprocessing",
    "threading",
    "pathlib",
    "shutil",
    "tempfile",
    "builtins",
    "code",
    "pty",
    "mmap",
    "resource",
    "_thread",
    "posix",
    "_posixsubprocess",
    "_ctypes",
    "_socket",
    "_signal",
]
DEFAULT_REMOVED_BUILTINS = ["breakpoint", "input", "help", "exit", "quit", "copyright", "credits", "license"]

_MODULE_PATTERN = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*(\.\*)?$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
MiB = 1024 * 1024


class Mount(BaseModel):
    """A host path shown inside the sandbox: read-only unless ``writable``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    source: str = Field(description="Absolute host path; it must exist when the Sandbox starts.")
    target: str = Field(description="Absolute path inside the sandbox where it appears.")
    writable: bool = Field(False, description="Allow the code to write there (the space used is the host's).")

    @field_validator("source", "target")
    @classmethod
    def _absolute(cls, path: str) -> str:
        if not path.startswith("/") or path.rstrip("/") == "" or "\0" in path:
            raise ValueError(f"must be an absolute path other than '/': {path!r}")
        if any(part in (".", "..") for part in path.split("/")):
            raise ValueError(f"must not contain '.' or '..' components: {path!r}")
        return path.rstrip("/")


class Policy(BaseModel):
    """Limits, allowlists and isolation for one tenant. Unknown fields are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)

    # --- time -------------------------------------------------------------
    wall_time_s: float = Field(
        10.0, gt=0, le=86_400, description="Wall-clock limit of one run, enforced by the supervisor with SIGKILL."
    )
    cpu_time_s: float = Field(5.0, gt=0, le=86_400, description="CPU-time limit of one run (all threads).")

    # --- memory and output -------------------------------------------------
    memory_mb: int = Field(
        256,
        ge=64,
        le=1_048_576,
        description="Memory of one worker: RLIMIT_DATA, the memory cgroup and the RSS watchdog.",
    )
    max_output_bytes: int = Field(
        1 * MiB, ge=1, description="stdout and stderr of one run together; past it the run fails."
    )
    max_result_bytes: int = Field(8 * MiB, ge=1, description="Serialized size of one output variable.")
    max_reply_bytes: int = Field(
        32 * MiB, ge=1024, description="Serialized size of all output variables of one run together."
    )
    max_out_files: int = Field(
        100, ge=0, le=100_000, description="Entries under ./out/ a run may leave: files returned or skipped."
    )
    max_out_files_bytes: int = Field(16 * MiB, ge=0, description="Bytes of all files a run returns together.")

    # --- files, processes ------------------------------------------------------
    max_file_size_mb: int = Field(16, ge=0, description="RLIMIT_FSIZE: largest file a run can write.")
    max_open_files: int = Field(64, ge=16, le=65_536, description="RLIMIT_NOFILE.")
    scratch_mb: int = Field(64, ge=1, description="Space for the run's scratch directory (its cwd).")
    tmp_mb: int = Field(16, ge=1, description="Space for /tmp and for /dev/shm, each (one tmpfs holds all three).")
    allow_processes: bool = Field(False, description="May the code fork and exec?")
    max_processes: int = Field(16, ge=1, le=4096, description="Processes when allowed (pids cgroup, RLIMIT_NPROC).")
    max_threads: int = Field(32, ge=1, le=4096, description="Threads per worker (pids cgroup, RLIMIT_NPROC).")

    # --- Python-level policy (defence in depth, not the wall) ----------------
    allowed_modules: list[str] = Field(default_factory=lambda: list(DEFAULT_ALLOWED_MODULES))
    denied_modules: list[str] = Field(default_factory=lambda: list(DEFAULT_DENIED_MODULES))
    removed_builtins: list[str] = Field(default_factory=lambda: list(DEFAULT_REMOVED_BUILTINS))

    # --- isolation ---------------------------------------------------------------
    network: bool = Field(False, description="Keep the host network namespace and allow IP sockets.")
    egress: list[str] = Field(
        default_factory=list,
        description="With network = false, the only destinations the code may reach: 'HOST:PORT', 'IP:PORT', "
        "'[IPv6]:PORT', 'CIDR:PORT' (PORT: number, range 'A-B' or '*'); TCP, or UDP with a 'udp:' prefix.",
    )
    filesystem: Literal["scratch", "readonly"] = Field(
        "scratch", description="'scratch': /work, /tmp, /dev/shm writable; 'readonly': nothing writable."
    )
    mounts: list[Mount] = Field(
        default_factory=list, description="Host paths shown inside the sandbox: {source, target, writable=false}."
    )
    env: list[str] = Field(
        default_factory=list, description="Names of supervisor environment variables passed to the code."
    )
    required_layers: Literal["auto"] | list[Layer] = Field(
        "auto", description="Layers that must be active, or 'auto': every layer this host supports."
    )
    skip_layers: list[Layer] = Field(
        default_factory=list,
        description="Layers not to apply at all (for trusted tenants, or to measure a layer's cost).",
    )

    # --- worker reuse -------------------------------------------------------------
    fresh_process_per_run: bool = Field(False, description="Never reuse a worker process.")
    max_runs_per_worker: int = Field(10_000, ge=1, description="Recycle a worker after this many runs.")
    max_memory_growth_mb: int = Field(
        64, ge=1, description="Recycle a worker whose RSS grew this much since its first run."
    )

    # --- quotas and fair share ---------------------------------------------------------
    max_concurrency: int | None = Field(None, ge=1, description="Runs of this tenant in flight at once.")
    max_queued: int = Field(10_000, ge=0, description="Runs waiting; beyond it, QuotaExceeded at once.")
    rate_per_s: float | None = Field(None, gt=0, description="Token-bucket refill rate of submitted runs.")
    burst: int = Field(100, ge=1, description="Token-bucket size when rate_per_s is set.")
    weight: float = Field(1.0, gt=0, le=1000, description="Fair-share weight against other tenants.")

    # --- sessions (Sandbox.session) ------------------------------------------------------
    max_sessions: int = Field(4, ge=0, le=4096, description="Sessions of this tenant open at once (0: none).")
    session_idle_s: float = Field(
        300.0, gt=0, le=86_400, description="A session with no run for this long is ended and its worker freed."
    )
    session_max_s: float = Field(3600.0, gt=0, le=7 * 86_400, description="Longest life of one session.")

    @field_validator("allowed_modules", "denied_modules")
    @classmethod
    def _module_patterns(cls, patterns: list[str]) -> list[str]:
        bad = [p for p in patterns if not _MODULE_PATTERN.match(p)]
        if bad:
            raise ValueError(f"not a module name or 'pkg.*' pattern: {', '.join(map(repr, bad))}")
        return patterns

    @field_validator("removed_builtins")
    @classmethod
    def _builtin_names(cls, names: list[str]) -> list[str]:
        bad = [n for n in names if not n.isidentifier() or n == "__import__"]
        if bad:
            raise ValueError(f"cannot remove builtins {', '.join(map(repr, bad))}")
        return names

    @field_validator("env")
    @classmethod
    def _env_names(cls, names: list[str]) -> list[str]:
        bad = [n for n in names if not _ENV_NAME.match(n)]
        if bad:
            raise ValueError(f"not environment variable names: {', '.join(map(repr, bad))}")
        return names

    @field_validator("egress")
    @classmethod
    def _egress_entries(cls, entries: list[str]) -> list[str]:
        problems = []
        for entry in entries:
            try:
                parse_egress(entry)
            except ValueError as exc:
                problems.append(f"{entry!r}: {exc}")
        if problems:
            raise ValueError(f"invalid egress entries: {'; '.join(problems)}")
        return entries

    @model_validator(mode="before")
    @classmethod
    def _readonly_paths_became_mounts(cls, fields: object) -> object:
        """``readonly_paths`` was the old, read-only-at-the-same-path form of ``mounts``: one way now."""
        if isinstance(fields, dict) and "readonly_paths" in fields:
            paths = fields["readonly_paths"]
            example = ", ".join(f'{{source = "{p}", target = "{p}"}}' for p in (paths or ["/srv/data"])[:2])
            raise ValueError(f"readonly_paths was replaced by mounts; write mounts = [{example}]")
        return fields

    @field_validator("mounts")
    @classmethod
    def _distinct_targets(cls, mounts: list[Mount]) -> list[Mount]:
        targets = sorted(m.target for m in mounts)
        for outer, inner in itertools.pairwise(targets):
            if inner == outer:
                raise ValueError(f"two mounts on one target {inner!r}")
            if inner.startswith(outer + "/"):
                raise ValueError(f"mount target {inner!r} lies inside another mount's target {outer!r}")
        return mounts

    @model_validator(mode="after")
    def _consistent(self) -> Policy:
        if self.max_reply_bytes < self.max_result_bytes:
            raise ValueError("max_reply_bytes must be at least max_result_bytes")
        if self.required_layers != "auto" and set(self.required_layers) & set(self.skip_layers):
            raise ValueError("a layer cannot be both in required_layers and in skip_layers")
        if self.network and self.egress:
            raise ValueError("egress applies only when network = false (network = true is the whole network)")
        skipped = sorted(set(self.skip_layers) & set(EGRESS_LAYERS))
        if self.egress and skipped:
            raise ValueError(f"egress is enforced by layers {', '.join(skipped)}: they cannot be skipped with egress")
        if self.filesystem == "readonly" and any(m.writable for m in self.mounts):
            raise ValueError("filesystem = 'readonly' allows no writable mount")
        return self
