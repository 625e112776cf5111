"""What a successful run returns.

Owns: ``Result`` and ``RunStats``, plain containers the host filled in.

Must never: reference the worker process or anything foreign. ``outputs``
holds only decoded inert data and ``Opaque`` handles.
"""

from __future__ import annotations

import socket
from dataclasses import asdict, dataclass, field

# Read once: a run's stats name the host it ran on without a system call per run.
_HOST_NAME = socket.gethostname()


@dataclass(frozen=True)
class RunStats:
    """Measurements of one run. Readable as attributes or as ``stats["wall_s"]``."""

    wall_s: float
    cpu_s: float
    peak_memory_bytes: int
    worker_pid: int
    tenant: str
    # Where the run ran: the host name for a local Sandbox, the Ray node id
    # for a ClusterSandbox, so that code reads it the same way everywhere.
    node: str = _HOST_NAME

    def __getitem__(self, name: str) -> object:
        if name not in self.__dataclass_fields__:
            raise KeyError(name)
        return getattr(self, name)

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


@dataclass(frozen=True)
class Result:
    """The outcome of a run that ended normally.

    ``outputs`` maps each variable the code bound to its value (inert data
    decoded, everything else as ``Opaque``); ``skipped`` maps each variable
    that was not exported to the reason; ``stdout``/``stderr`` are what the
    run printed. ``files`` holds every regular file the run left under
    ``./out/`` (keyed by its path relative to ``out/``) and every input file
    outside ``out/`` whose content it changed (keyed by its path in
    ``files=``); ``skipped_files`` maps each entry there that was not read
    (a symbolic link, FIFO, socket or device) to the reason. Their paths are
    checked relative paths, but still the worker's words: write them with
    ``sandbox.files.write_files``, never by joining them yourself.
    """

    outputs: dict[str, object]
    stdout: str
    stderr: str
    skipped: dict[str, str]
    stats: RunStats
    files: dict[str, bytes] = field(default_factory=dict)
    skipped_files: dict[str, str] = field(default_factory=dict)
