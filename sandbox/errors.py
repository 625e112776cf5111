"""Every error a run can end in.

Owns: the exception hierarchy of the public API. Each class says what
happened in terms a user can act on, and carries whatever the run had
written to stdout and stderr before it ended.

Must never: hold a live object from a worker. Everything here is plain
strings and numbers that the host produced or bounded itself.
"""

from __future__ import annotations


class SandboxError(Exception):
    """Base class of every error raised by the sandbox.

    ``stdout`` and ``stderr`` hold what the run had written so far (empty if
    it never started).
    """

    def __init__(self, message: str, *, stdout: str = "", stderr: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.stdout = stdout
        self.stderr = stderr


class CodeError(SandboxError):
    """The code raised an exception.

    ``type_name`` is the remote exception's type, ``remote_message`` its
    text, and ``traceback`` shows only the user's own frames with the line
    numbers of the submitted code.
    """

    def __init__(self, type_name: str, remote_message: str, traceback: str, **captured: str) -> None:
        super().__init__(remote_message, **captured)
        self.type_name = type_name
        self.remote_message = remote_message
        self.traceback = traceback

    def __str__(self) -> str:
        return f"{self.message}\n{self.traceback}" if self.traceback else self.message


class TimeLimitExceeded(SandboxError):
    """The run used up its wall-clock (``kind='wall'``) or CPU (``kind='cpu'``) time."""

    def __init__(self, message: str, *, kind: str, limit_s: float, **captured: str) -> None:
        super().__init__(message, **captured)
        self.kind = kind
        self.limit_s = limit_s


class MemoryLimitExceeded(SandboxError):
    """The run needed more memory than its policy's ``memory_mb``."""

    def __init__(self, message: str, *, limit_mb: int, **captured: str) -> None:
        super().__init__(message, **captured)
        self.limit_mb = limit_mb


class OutputLimitExceeded(SandboxError):
    """Captured output passed ``max_output_bytes`` (``variable`` is None; the
    captured head is kept), or an output variable passed ``max_result_bytes``
    (``variable`` names it), or the files a run left passed ``max_out_files``
    or ``max_out_files_bytes``. ``limit`` names the policy field, and
    ``limit_bytes`` holds its value (a count for ``max_out_files``)."""

    def __init__(
        self,
        message: str,
        *,
        limit_bytes: int,
        variable: str | None = None,
        limit: str | None = None,
        **captured: str,
    ) -> None:
        super().__init__(message, **captured)
        self.limit_bytes = limit_bytes
        self.variable = variable
        self.limit = limit


class PolicyViolation(SandboxError):
    """The code tried something its tenant's policy forbids, such as a denied import."""

    def __init__(self, message: str, *, tenant: str, module: str | None = None, **captured: str) -> None:
        super().__init__(message, **captured)
        self.tenant = tenant
        self.module = module


class WorkerCrashed(SandboxError):
    """The worker process died mid-run, or broke the protocol and was killed.

    ``signal`` / ``exit_code`` say how it died (when known);
    ``protocol_violation`` is True when the supervisor killed it for sending
    something it must not.
    """

    def __init__(
        self,
        message: str,
        *,
        signal: int | None = None,
        exit_code: int | None = None,
        protocol_violation: bool = False,
        **captured: str,
    ) -> None:
        super().__init__(message, **captured)
        self.signal = signal
        self.exit_code = exit_code
        self.protocol_violation = protocol_violation


class NodeLost(WorkerCrashed):
    """The cluster node (or its node agent) running this run was lost mid-run.

    The run may have had side effects there, so it is never run again on
    another node; resubmit it if that is safe. ``node`` is the Ray node id.
    """

    def __init__(self, message: str, *, node: str, stdout: str = "", stderr: str = "") -> None:
        super().__init__(message, stdout=stdout, stderr=stderr)
        self.node = node


class QuotaExceeded(SandboxError):
    """The tenant is over a quota; retry later.

    ``quota`` names it: ``max_queued`` or ``rate`` for a run; for a session
    that cannot start, ``max_sessions``, ``max_concurrency`` or ``workers``
    (every worker of the Sandbox is busy or held by a session).
    """

    def __init__(self, message: str, *, tenant: str, quota: str) -> None:
        super().__init__(message)
        self.tenant = tenant
        self.quota = quota


class SessionLost(SandboxError):
    """The session is over, and this call cannot run in it; open a new session.

    The message says why: a run ended the session's worker (it hit a limit,
    crashed, was cancelled, or left the worker unfit for another run), the
    session idled past ``session_idle_s`` or lived past ``session_max_s``,
    or it was closed. ``run`` is the number of the session's run that ended
    it (1 for its first run), or None when no run did.
    """

    def __init__(self, message: str, *, run: int | None = None, **captured: str) -> None:
        super().__init__(message, **captured)
        self.run = run


class InputError(SandboxError):
    """An input could not be bound: a bad name, or a value that does not load in the worker."""


class SandboxClosed(SandboxError):
    """The Sandbox was shut down before this run could finish."""


class ConfinementUnavailable(SandboxError):
    """A policy requires an isolation layer that this host cannot provide.

    ``layer`` names it and ``reason`` says why; the Sandbox refuses to run
    rather than run with less isolation than asked for.
    """

    def __init__(self, message: str, *, layer: str, reason: str) -> None:
        super().__init__(message)
        self.layer = layer
        self.reason = reason


class MountError(SandboxError):
    """A tenant's ``mounts`` cannot be given to its workers; the Sandbox refuses to start.

    ``tenant``, ``field`` (``mounts[i].source`` or ``mounts[i].target``) and
    ``path`` say which entry, and the message says what to change.
    """

    def __init__(self, message: str, *, tenant: str, field: str, path: str) -> None:
        super().__init__(message)
        self.tenant = tenant
        self.field = field
        self.path = path
