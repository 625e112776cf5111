"""A confined worker's main loop: read a request, run it, write the reply.

Owns: the per-run housekeeping around ``runtime.codenode``: the CPU budget
(soft ``RLIMIT_CPU`` moved before each run), the peak-memory reading, the
captured standard streams, emptying the scratch space, and telling the host
when this process should not be reused.

A session's worker (``settings["session"]``) serves one session for its
whole life and keeps what a notebook kernel keeps between runs: the
namespace, the files in its scratch space, /tmp and /dev/shm, and the files
its code left open. Nothing a run started keeps running: processes are
killed and leftover tasks cancelled after every run as for any worker, and
a thread left running, or memory exhausted (the namespace had to be
cleared), makes the worker ask to be retired, which ends the session.

Must never: be trusted by the host, or touch anything outside this worker.
Everything written here is produced in the same process as hostile code,
which can rewrite any of it; the host therefore enforces every limit that
matters (wall time, output size, frame size, reply token) on its own side,
and what this loop reports is at most a lie about its own run. Emptying the
scratch space only ever touches the directories ``runtime.confine`` created
for this worker, each checked against the device it was created on.

Standard output and error are fds 1 and 2, pipes read directly by the host,
so ``print``, ``sys.stdout`` and raw ``os.write(1, ...)`` are all captured
and counted by the host as they happen. Python's own buffers are flushed
before every reply, and the host drains the pipes when the reply arrives,
so every byte a run wrote before it finished belongs to that run.
"""

from __future__ import annotations

import _thread
import io
import os
import pickle
import resource
import shutil
import signal
import sys
import time
from time import perf_counter  # bound at import: a run may replace time.perf_counter

from sandbox.runtime import linux, wire
from sandbox.runtime.codenode import CodeNode, RunOutcome
from sandbox.runtime.confine import CLEAR_REFS_FD, Scratch
from sandbox.runtime.files import OUT_DIR, Collection, InputFileFailed, TooManyFiles, write_inputs
from sandbox.runtime.inits import WORKER_PID_IN_NAMESPACE

_LEFTOVER_GRACE_S = 1.0  # how long processes killed at the end of a run may take to disappear
# How long a worker looks for its next request before it sleeps (wire.FrameReader):
# longer than the host takes to answer a reply with the next run when runs
# follow each other (about 100 us here), short against a run's own cost.
_LOOK_FOR_NEXT_S = 200e-6


def serve(channel: int, layers: dict[str, str], scratch: Scratch, settings: dict) -> None:
    own_fds = _identities()  # stdin, stdout, stderr and the channel, as confinement left them
    limits = _limits()
    cpu_hard = resource.getrlimit(resource.RLIMIT_CPU)[1]
    # With seccomp on, no rlimit can change (sandbox.seccomp); otherwise a run
    # could lower its own, and the worker must notice before reusing itself.
    limits_locked = layers.get("seccomp") == "on"
    allow_processes = settings["allow_processes"]
    session = settings["session"]
    # typeshed marks the __std*__ originals Final; here they are replaced on purpose.
    sys.stdout = sys.__stdout__ = _text_stream(1)  # type: ignore[misc]
    sys.stderr = sys.__stderr__ = _text_stream(2)  # type: ignore[misc]
    node = CodeNode(settings)
    peak = _PeakMemory(scratch.clear_refs)
    first_run_fd = CLEAR_REFS_FD + 1 if scratch.clear_refs else CLEAR_REFS_FD
    requests = wire.FrameReader(channel)
    wire.write_all(channel, wire.frame(wire.encode_hello(layers, None)))
    reused = not settings["single_run"]
    look_s = 0.0
    while True:
        waiting_since = perf_counter()
        try:
            payload = requests.next(look_s)
        except OSError:
            os._exit(wire.EXIT_CHANNEL_LOST)
        waited_s, look_s = perf_counter() - waiting_since, 0.0
        if payload is None:
            return
        request = pickle.loads(payload)
        if request[0] == "setup":
            os.environ.clear()
            os.environ.update(request[1])
            continue
        token, cpu_time_s, files = request[1], request[6], request[7]
        os.chdir(scratch.cwd)
        before = _cpu_seconds(resource.getrusage(resource.RUSAGE_SELF))
        peak.reset()
        outcome, written = _run(node, scratch, request)
        if allow_processes:
            _end_leftover_processes()
        if not session:
            os.closerange(first_run_fd, linux.FD_CEILING)  # fds the run opened and left open die with it
        # In a session ./out/ keeps what earlier runs left, like everything else there.
        untouched = not session and scratch.untouched()
        if untouched and not files:
            collection = Collection(0, 0)  # ./out/ is empty: nothing was created anywhere
        else:
            collection = _collect_files(outcome, scratch, files, written, settings)
        if session:
            retire = _restore_stdio() | outcome.retire | (outcome.status == wire.MEMORY_LIMIT)
        else:
            retire = _restore_stdio() | outcome.retire | (not untouched and _empty_scratch(scratch))
        usage = resource.getrusage(resource.RUSAGE_SELF)
        used = _cpu_seconds(usage)
        retire |= (
            _thread._count() > 0
            or (not limits_locked and _limits() != limits)
            or (cpu_hard != resource.RLIM_INFINITY and used + cpu_time_s + 1 > cpu_hard)
        )
        fds = _identities()
        if fds[channel] != own_fds[channel]:
            os._exit(wire.EXIT_CHANNEL_LOST)  # never write a reply into whatever user code put on fd 3
        retire |= fds != own_fds  # a closed or replaced stdio would break the next run
        reply = _reply(token, outcome, collection, used - before, usage.ru_maxrss * 1024, used, retire, settings)
        try:
            wire.write_all(channel, wire.frame(reply))
        except OSError:
            os._exit(wire.EXIT_CHANNEL_LOST)
        # Look for the next run before sleeping only while runs come back to
        # back: one long wait stops it until they do again, and a worker the
        # host stops now has no next run.
        if reused and not retire and waited_s < _LOOK_FOR_NEXT_S:
            look_s = _LOOK_FOR_NEXT_S


def _run(node: CodeNode, scratch: Scratch, request: tuple) -> tuple[RunOutcome, dict]:
    """Write the run's files, then run its code; a file that cannot be written fails the run.
    Also returns each written file's signature (``runtime.files.signature``)."""
    _, _, code, inputs, allow_await, filename, _, files = request
    try:
        written = write_inputs(scratch.cwd, files)
    except InputFileFailed as exc:
        outcome = RunOutcome(wire.INPUT_ERROR)
        outcome.error = ("InputError", f"file {exc.path!r} could not be written: {exc}", "", f"files[{exc.path!r}]")
        return outcome, {}
    return node.run(code, inputs, allow_await, filename), written


def _collect_files(
    outcome: RunOutcome, scratch: Scratch, files: dict[str, bytes], written: dict, settings: dict
) -> Collection:
    """What a successful run left in ./out/ and in its input files; past a limit, the run fails."""
    collection = Collection(settings["max_out_files"], settings["max_out_files_bytes"])
    if outcome.status != wire.OK:
        return collection
    try:
        collection.collect(scratch.cwd, files, written)
    except TooManyFiles as exc:
        outcome.status = wire.FILES_LIMIT
        outcome.outputs, outcome.skipped = [], {}
        outcome.error = ("OutputLimitExceeded", str(exc), "", exc.limit)
        return Collection(0, 0)
    return collection


def _reply(
    token: bytes,
    outcome: RunOutcome,
    collection: Collection,
    cpu_s: float,
    peak_rss: int,
    worker_cpu_s: float,
    retire: bool,
    settings: dict,
) -> bytes:
    error = outcome.error
    if error is not None:
        limit = settings["max_error_text_bytes"]
        type_name, message, traceback, detail = error
        # Keep the head of a long message and the tail of a long traceback:
        # that is where the exception itself is.
        error = (
            wire.clip_text(type_name, 200),
            wire.clip_text(message, limit),
            wire.clip_text(traceback, limit, keep_tail=True),
            wire.clip_text(detail, 200),
        )
    reply = wire.encode_reply(
        wire.Reply(
            token,
            outcome.status,
            cpu_s,
            peak_rss,
            worker_cpu_s,
            retire,
            outcome.outputs,
            outcome.skipped,
            error,
            collection.files,
            collection.skipped,
        )
    )
    if len(reply) > settings["max_frame_bytes"]:
        message = (
            f"the run's outputs and files take {len(reply)} bytes in all, "
            f"over the frame limit of {settings['max_frame_bytes']}"
        )
        reply = wire.encode_reply(
            wire.Reply(
                token,
                wire.OUTPUT_LIMIT,
                cpu_s,
                peak_rss,
                worker_cpu_s,
                retire,
                [],
                {},
                ("OutputLimitExceeded", message, "", ""),
            )
        )
    return reply


def _identities() -> list[tuple[int, int] | None]:
    """(device, inode) of fds 0 to 3, or None for a closed one."""
    identities: list[tuple[int, int] | None] = []
    for fd in range(4):
        try:
            st = os.fstat(fd)
            identities.append((st.st_dev, st.st_ino))
        except OSError:
            identities.append(None)
    return identities


def _text_stream(fd: int) -> io.TextIOWrapper:
    return io.TextIOWrapper(
        io.FileIO(fd, "w", closefd=False), encoding="utf-8", errors="backslashreplace", line_buffering=True
    )


def _restore_stdio() -> bool:
    """Flush the standard streams; put ours back if user code replaced them."""
    broken = False
    for name in ("stdout", "stderr"):
        ours = getattr(sys, f"__{name}__")
        if getattr(sys, name) is not ours:
            setattr(sys, name, ours)
        try:
            ours.flush()
        except (OSError, ValueError):
            broken = True
    return broken


def _cpu_seconds(usage: resource.struct_rusage) -> float:
    return usage.ru_utime + usage.ru_stime


def _limits() -> list[tuple[int, int]]:
    """Every rlimit that a run could lower for the runs after it."""
    return [resource.getrlimit(r) for r in _LIMITS]


_LIMITS = (
    resource.RLIMIT_CPU,
    resource.RLIMIT_DATA,
    resource.RLIMIT_NOFILE,
    resource.RLIMIT_FSIZE,
    resource.RLIMIT_STACK,
    resource.RLIMIT_NPROC,
    resource.RLIMIT_AS,
    resource.RLIMIT_CORE,
)


def _end_leftover_processes() -> None:
    """Nothing a run starts outlives it: SIGKILL every other process of our
    PID namespace, and wait until they are gone. Only when the policy allows
    processes; otherwise seccomp refuses to create any.

    ``kill(-1)`` reaches every process the caller may signal except init and
    itself. That is exactly the run's leftovers only when we are pid 2 of a
    namespace of our own (see runtime.zygote); anywhere else it would reach
    the host, so then we do nothing, and the policy cannot allow processes
    without PID namespaces anyway (seccomp refuses fork). Our own children
    are reaped here; orphans belong to the namespace's init, which reaps
    them as they die, so we watch /proc until only init and we are left.
    """
    if os.getpid() != WORKER_PID_IN_NAMESPACE:
        return
    try:
        os.kill(-1, signal.SIGKILL)
    except ProcessLookupError:
        return  # nobody else there
    deadline = time.monotonic() + _LEFTOVER_GRACE_S
    while time.monotonic() < deadline:
        try:
            while os.waitpid(-1, os.WNOHANG)[0]:
                pass
        except ChildProcessError:
            pass
        if not [name for name in os.listdir("/proc") if name.isdigit() and int(name) > WORKER_PID_IN_NAMESPACE]:
            return
        time.sleep(0.001)


def _empty_scratch(scratch: Scratch) -> bool:
    """Empty this worker's own scratch directories; True if that failed.

    A directory is touched only while it is still on the device confinement
    created it on, and entries that were there from the start (mount points
    of read-only binds) or that sit on another device are left alone.
    """
    failed = False
    for directory in scratch.dirs:
        try:
            if os.lstat(directory.path).st_dev != directory.device:
                failed = True
                continue
            for entry in os.scandir(directory.path):
                if entry.name in directory.keep or entry.stat(follow_symlinks=False).st_dev != directory.device:
                    continue
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.path, ignore_errors=True)
                else:
                    os.unlink(entry.path)
        except OSError:
            failed = True
    if failed:
        return True  # the worker retires; nothing is made where a check failed
    return _remake_out_dir(scratch)


def _remake_out_dir(scratch: Scratch) -> bool:
    """An empty ./out/ for the next run; True if that failed."""
    path = os.path.join(scratch.cwd, OUT_DIR)
    try:
        if not os.path.lexists(path):
            os.mkdir(path, 0o700)
        out = os.lstat(path)
    except OSError:
        return True
    scratch.out_dir = (out.st_dev, out.st_ino)
    return False


class _PeakMemory:
    """Per-run peak RSS: reset the high-water mark, so ru_maxrss after the run is this run's peak."""

    def __init__(self, usable: bool) -> None:
        self._usable = usable

    def reset(self) -> None:
        if self._usable:
            try:
                os.write(CLEAR_REFS_FD, b"5")
            except OSError:
                self._usable = False
