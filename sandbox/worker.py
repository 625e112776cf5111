"""One worker process, as the supervisor sees it.

Owns: the worker's channel socket, its stdout/stderr pipes, its pidfds and
its life (starting -> idle <-> busy -> dead), and every limit the host
enforces on a run inside it: wall time, output size, frame size and shape,
and the per-run reply token. Also the run's output as text: decoded piece
by piece as it is read, kept for the run's result and shown as it comes to
the run's observer, if it has one (``Sandbox.stream``).

Must never: block the event loop (every fd is non-blocking and served by a
loop callback), trust a byte the worker sends (frames are bounded before
they are buffered, decoded by ``runtime.wire.decode_reply`` and matched to
the run's random token), or end a run twice (``Job`` ignores every outcome
after the first). Any protocol violation kills the worker, and a dead
worker is never reused.

A run ends in exactly one of these ways, each of which releases the worker
to the pool, or reports it lost:

* a valid reply arrives           -> ``Completed`` (the supervisor decodes it)
* the wall-clock timer fires      -> ``TimeLimitExceeded`` and SIGKILL
* output passes its cap           -> ``OutputLimitExceeded`` and SIGKILL
* the worker breaks the protocol  -> ``WorkerCrashed`` and SIGKILL
* the watchdog sees RSS or CPU over the limit -> the matching error, SIGKILL
* the worker dies on its own      -> an error built from the zygote's exit report
* the awaiting task is cancelled  -> SIGKILL; the caller sees CancelledError
"""

from __future__ import annotations

import asyncio
import codecs
import enum
import hmac
import os
import pickle
import select
import signal
import socket
from collections.abc import Callable
from typing import Protocol

from sandbox import egress, outcome, procfs
from sandbox.errors import ConfinementUnavailable, SandboxError
from sandbox.job import Job
from sandbox.profile import MAX_ERROR_TEXT_BYTES, TenantProfile
from sandbox.runtime import wire
from sandbox.zygote import ExitInfo, SpawnFailed, Zygote

_PIPE_CHUNK = 64 * 1024
_UTF8 = codecs.getincrementaldecoder("utf-8")
_HELLO_TIMEOUT_S = 30.0
_EXIT_REPORT_GRACE_S = 1.0
_DYING_GRACE_S = 0.05  # how long a worker whose channel closed may take to be seen exited
# One receive buffer for every channel: the loop runs one callback at a
# time, and reusing it spares a large allocation per message.
_RECEIVE_BUFFER = memoryview(bytearray(256 * 1024))


class State(enum.Enum):
    STARTING = "starting"
    IDLE = "idle"
    BUSY = "busy"
    DEAD = "dead"


class Completed:
    """A run whose worker replied; its reply still has to be decoded."""

    __slots__ = ("reply", "stderr", "stdout", "wall_s", "worker_pid")

    def __init__(self, reply: wire.Reply, stdout: str, stderr: str, wall_s: float, worker_pid: int) -> None:
        self.reply = reply
        self.stdout = stdout
        self.stderr = stderr
        self.wall_s = wall_s
        self.worker_pid = worker_pid


class Listener(Protocol):
    def worker_released(self, worker: WorkerProcess, *, retire: bool) -> None: ...

    def worker_lost(self, worker: WorkerProcess) -> None: ...


class WorkerProcess:
    """``dedicated``: the worker of one session (see ``sandbox.session``): it
    keeps its state between runs and is never reused by anything else."""

    def __init__(self, worker_id: int, profile: TenantProfile, listener: Listener, *, dedicated: bool = False) -> None:
        self.id = worker_id
        self.profile = profile
        self.dedicated = dedicated
        self.tenant = profile.name
        self.state = State.STARTING
        self.pid = 0
        self.layers: dict[str, str] = {}
        # What the kernel charges this worker's own memory cgroup, once its hello says it joined one.
        self.memory_usage_file: str | None = None
        # Where it may have processes besides itself (they are allowed, or no
        # seccomp filter forbids them): the list of every process of its own
        # pids cgroup, or without one, the host pid of its PID namespace's init.
        self.processes_file: str | None = None
        self.init_pid = 0
        self.runs = 0
        self.memory_charge = 0  # private bytes, counted against the pool's warm budget while idle
        self.worker_cpu_s = 0.0  # cumulative, as last reported by the worker
        self.first_peak_rss: int | None = None
        self.idle_since = 0.0
        self.job: Job | None = None
        self.exit_info: ExitInfo | None = None
        self.end_reason: str | None = None  # why the host ended this worker between runs, if it did
        self._listener = listener
        self._loop = asyncio.get_running_loop()
        self._sock: socket.socket | None = None
        self._pipes: list[int] = []
        self._pipe_poll = select.poll()
        self._pidfds: list[int] = []
        self._rx = bytearray()
        self._tx: list[memoryview] = []
        self._hello: asyncio.Future[tuple[dict[str, str], str | None]] | None = None
        self._token = b""
        self._timer: asyncio.TimerHandle | None = None
        self._captured: tuple[list[str], list[str]] = ([], [])
        self._captured_bytes = 0
        self._decoders = (_UTF8("replace"), _UTF8("replace"))
        self._awaiting_exit: Callable[[ExitInfo | None], None] | None = None

    # --- start -------------------------------------------------------------

    async def start(self, zygote: Zygote) -> None:
        """Fork the worker, wait for its hello, send its environment."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        out_r, out_w = os.pipe2(os.O_CLOEXEC)
        err_r, err_w = os.pipe2(os.O_CLOEXEC)
        self._sock, self._pipes = ours, [out_r, err_r]
        try:
            config = self.profile.worker_config(self.id, session=self.dedicated)
            if self.profile.egress:
                config["egress"] = await egress.pin(list(self.profile.egress))
            spawned = await zygote.spawn(self.id, config, [theirs.fileno(), out_w, err_w], self._on_exit)
            self._pidfds = [spawned.init, spawned.worker]
        except SpawnFailed as exc:
            self._close_fds()
            if exc.layer is None:
                raise
            raise ConfinementUnavailable(
                f"a worker of tenant {self.tenant!r} could not apply layer {exc.layer!r}: {exc.reason}",
                layer=exc.layer,
                reason=exc.reason,
            ) from None
        except BaseException:
            self._close_fds()
            raise
        finally:
            theirs.close()
            os.close(out_w)
            os.close(err_w)
        self.pid = procfs.pidfd_pid(self._pidfds[1])
        ours.setblocking(False)
        for fd in self._pipes:
            os.set_blocking(fd, False)
            self._pipe_poll.register(fd, select.POLLIN)
        self._loop.add_reader(ours.fileno(), self._on_channel)
        self._loop.add_reader(out_r, self._on_output, 0)
        self._loop.add_reader(err_r, self._on_output, 1)
        self._hello = self._loop.create_future()
        try:
            layers, error = await asyncio.wait_for(self._hello, _HELLO_TIMEOUT_S)
        except BaseException:
            self.kill()
            raise
        if error is not None:
            self.kill()
            layer, _, reason = error.partition(": ")
            raise ConfinementUnavailable(
                f"a worker of tenant {self.tenant!r} could not apply layer {layer!r}: {reason}",
                layer=layer,
                reason=reason,
            )
        self.layers = layers
        cgroups = self.profile.cgroups if layers.get("cgroup") == "on" else None
        if cgroups is not None:
            self.memory_usage_file = cgroups.usage_file(spawned.cgroups)
        if self.profile.policy.allow_processes or layers.get("seccomp") != "on":
            self.processes_file = cgroups.processes_file(spawned.cgroups) if cgroups is not None else None
            if self.processes_file is None and layers.get("pidns") == "on":
                self.init_pid = procfs.pidfd_pid(self._pidfds[0])
        self._send(wire.frame(pickle.dumps(wire.setup_request(self.profile.env))))
        self.state = State.IDLE
        self.idle_since = self._loop.time()

    # --- runs ----------------------------------------------------------------

    def begin(self, job: Job) -> None:
        """Send a run to this idle worker and start its wall-clock timer."""
        assert self.state is State.IDLE
        self.state = State.BUSY
        self.job = job
        self._token = os.urandom(wire.TOKEN_BYTES)
        self._captured_bytes = 0  # the buffers and decoders were left empty by the last run's _take_output
        request = wire.run_request(
            self._token, job.code, job.inputs, job.allow_await, job.filename, self.profile.policy.cpu_time_s, job.files
        )
        job.started_at = self._loop.time()
        self._timer = self._loop.call_at(job.started_at + job.wall_time_s, self._on_wall_timeout)
        self._send(wire.frame(pickle.dumps(request, protocol=pickle.HIGHEST_PROTOCOL)))

    def abandon(self, job: Job) -> None:
        """The caller stopped waiting for ``job``: kill the run and free the slot."""
        if self.job is job and self.state is State.BUSY:
            self.kill()
            self._listener.worker_lost(self)

    def fail_run(self, make_error: Callable[[str, str], SandboxError]) -> None:
        """End the current run with ``make_error(stdout, stderr)`` and kill the worker."""
        if self.job is None or self.state is not State.BUSY:
            return
        self._drain_outputs()
        if self.state is State.BUSY:  # unless the drain found the output cap exceeded
            self._end_run(make_error)

    def _end_run(self, make_error: Callable[[str, str], SandboxError]) -> None:
        job = self.job
        assert job is not None
        stdout, stderr = self._take_output()
        self.kill()
        job.fail(make_error(stdout, stderr))
        self._listener.worker_lost(self)

    def _finish(self, reply: wire.Reply) -> None:
        job = self.job
        assert job is not None and job.started_at is not None
        self._drain_outputs()
        if self.state is not State.BUSY:
            return  # the drain found the output cap exceeded
        stdout, stderr = self._take_output()
        self._cancel_timer()
        self.job = None
        self.state = State.IDLE
        now = self._loop.time()
        self.idle_since = now
        self.runs += 1
        self.worker_cpu_s = reply.worker_cpu_s
        if self.first_peak_rss is None:
            self.first_peak_rss = reply.peak_rss
        policy = self.profile.policy
        # A session's worker keeps its state on purpose: only the worker's
        # own report that it is unfit for another run retires it.
        retire = reply.retire or (
            not self.dedicated
            and (
                policy.fresh_process_per_run
                or self.runs >= policy.max_runs_per_worker
                or reply.peak_rss - self.first_peak_rss > policy.max_memory_growth_mb * 1024 * 1024
            )
        )
        job.resolve(Completed(reply, stdout, stderr, now - job.started_at, self.pid))
        self._listener.worker_released(self, retire=retire)

    def _on_wall_timeout(self) -> None:
        self._timer = None
        job = self.job
        if job is not None:
            self.fail_run(lambda out, err: outcome.wall_timeout(job.wall_time_s, out, err))

    # --- channel -------------------------------------------------------------

    @property
    def _channel(self) -> socket.socket:
        """The socket to the worker: every caller runs after ``start`` opened it."""
        assert self._sock is not None
        return self._sock

    def _on_channel(self) -> None:
        try:
            received = self._channel.recv_into(_RECEIVE_BUFFER)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            received = 0
        if not received:
            self._on_channel_closed()
            return
        buffer = self._rx
        buffer += _RECEIVE_BUFFER[:received]
        while len(buffer) >= wire.FRAME_HEADER.size:
            (length,) = wire.FRAME_HEADER.unpack_from(buffer)
            limit = wire.MAX_HELLO_BYTES if self.state is State.STARTING else self.profile.max_frame_bytes
            if length > limit:
                self._violation(f"it announced a frame of {length} bytes, over the limit of {limit}")
                return
            end = wire.FRAME_HEADER.size + length
            if len(buffer) < end:
                return
            payload = bytes(buffer[wire.FRAME_HEADER.size : end])
            del buffer[:end]
            self._on_frame(payload)
            if self.state is State.DEAD:
                return

    def _on_frame(self, payload: bytes) -> None:
        try:
            if self.state is State.STARTING and self._hello is not None and not self._hello.done():
                self._hello.set_result(wire.decode_hello(payload))
            elif self.state is State.BUSY:
                policy = self.profile.policy
                reply = wire.decode_reply(
                    payload,
                    policy.max_result_bytes,
                    MAX_ERROR_TEXT_BYTES,
                    policy.max_out_files,
                    policy.max_out_files_bytes,
                )
                if not hmac.compare_digest(reply.token, self._token):
                    raise wire.ProtocolError("its reply carries the wrong token")
                self._finish(reply)
            else:
                raise wire.ProtocolError("it sent a frame while no run was in flight")
        except wire.ProtocolError as exc:
            self._violation(str(exc))

    def _violation(self, detail: str) -> None:
        if self.state is State.BUSY:
            self.fail_run(lambda out, err: outcome.protocol_violation(detail, out, err))
            return
        self.kill()
        if self._hello is not None and not self._hello.done():
            self._hello.set_exception(SandboxError(f"worker broke the protocol while starting: {detail}"))
        else:
            self._listener.worker_lost(self)

    def _on_channel_closed(self) -> None:
        """The worker is dying, or user code closed the channel; find out which.

        A dying process closes its files before it counts as exited, so the
        channel's end can arrive first: the process gets a moment to finish
        dying on its own before it is taken for alive and killed.
        """
        job, was = self.job, self.state
        self._drain_outputs()
        stdout, stderr = self._take_output()
        if was is not State.BUSY or job is None:
            self.kill()
            if was is State.STARTING and self._hello is not None and not self._hello.done():
                self._hello.set_exception(SandboxError("worker exited while starting"))
            elif was is State.IDLE:
                self._listener.worker_lost(self)
            return
        pidfd = self._pidfds[1]
        self._loop.remove_reader(self._channel.fileno())  # its end of file would keep firing
        decided = False

        def decide(exited: bool) -> None:
            nonlocal decided
            if decided:
                return
            decided = True
            self._loop.remove_reader(pidfd)
            timer.cancel()
            self.kill()
            self._listener.worker_lost(self)
            if exited:
                self._when_exit_reported(lambda info: job.fail(outcome.worker_died(info, self.profile, stdout, stderr)))
            else:
                job.fail(outcome.channel_closed(stdout, stderr))

        timer = self._loop.call_later(_DYING_GRACE_S, decide, False)
        self._loop.add_reader(pidfd, decide, True)

    def _when_exit_reported(self, settle: Callable[[ExitInfo | None], None]) -> None:
        """Call ``settle`` with the zygote's exit report, or with None if it is late."""
        if self.exit_info is not None:
            settle(self.exit_info)
            return

        def once(info: ExitInfo | None) -> None:
            if self._awaiting_exit is not None:
                self._awaiting_exit = None
                settle(info)

        self._awaiting_exit = once
        self._loop.call_later(_EXIT_REPORT_GRACE_S, once, None)

    def _on_exit(self, info: ExitInfo) -> None:
        self.exit_info = info
        if self._awaiting_exit is not None:
            self._awaiting_exit(info)

    def _send(self, data: bytes) -> None:
        if self.state is State.DEAD:
            return
        if self._tx:
            self._tx.append(memoryview(data))
            return
        try:
            sent = self._channel.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            return  # the read side will see the worker's end and report it
        if sent < len(data):
            self._tx.append(memoryview(data)[sent:])
            self._loop.add_writer(self._channel.fileno(), self._flush_tx)

    def _flush_tx(self) -> None:
        while self._tx:
            try:
                sent = self._channel.send(self._tx[0])
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self._tx.clear()
                break
            if sent < len(self._tx[0]):
                self._tx[0] = self._tx[0][sent:]
                return
            self._tx.pop(0)
        self._loop.remove_writer(self._channel.fileno())

    # --- captured output ---------------------------------------------------------

    def _on_output(self, index: int) -> None:
        fd = self._pipes[index]
        try:
            data = os.read(fd, _PIPE_CHUNK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._loop.remove_reader(fd)  # user code closed its stdout/stderr
            self._pipe_poll.unregister(fd)
            return
        self._capture(index, data)

    def _capture(self, index: int, data: bytes) -> None:
        if self.state is not State.BUSY:
            # Output between runs comes from something the last run left
            # running. It belongs to no run; the worker is not reused.
            if self.state is State.IDLE:
                self.kill()
                self._listener.worker_lost(self)
            return
        limit = self.profile.policy.max_output_bytes
        room = limit - self._captured_bytes
        kept = data[:room]
        self._captured_bytes += len(kept)
        self._deliver(index, self._decoders[index].decode(kept))
        if len(data) > room:  # no drain first: whatever else is in the pipes is over the cap too
            self._end_run(lambda out, err: outcome.output_overflow(limit, out, err))

    def _drain_outputs(self) -> None:
        """Collect what the pipes already hold; one poll() when they hold nothing."""
        while self.state is State.BUSY:
            ready = self._pipe_poll.poll(0)
            if not ready:
                return
            for fd, _ in ready:
                # _on_output may have ended the run; mypy keeps the loop's narrowing across that call.
                if self.state is not State.BUSY:
                    return  # type: ignore[unreachable]
                self._on_output(self._pipes.index(fd))

    def _deliver(self, index: int, text: str) -> None:
        """Keep a piece of decoded output for the run's result and show it to its observer.

        Decoding happens here, piece by piece, for every run: what a stream
        shows and what ``Result.stdout``/``stderr`` hold are the same
        pieces, so they cannot disagree. An incremental decoder holds back
        the bytes of a character split across two reads until the rest
        arrives; invalid bytes become U+FFFD.
        """
        if not text:
            return
        self._captured[index].append(text)
        job = self.job
        if job is not None and job.observer is not None and job.started_at is not None:
            job.observer(index, text, self._loop.time() - job.started_at)

    def _take_output(self) -> tuple[str, str]:
        """The run's whole output; a character cut short at its end becomes U+FFFD.

        Leaves the buffers empty and the decoders reset for the next run."""
        for index, decoder in enumerate(self._decoders):
            self._deliver(index, decoder.decode(b"", final=True))
        out, err = self._captured
        self._captured = ([], [])
        return "".join(out), "".join(err)

    # --- end of life -------------------------------------------------------------

    def end_idle(self, reason: str) -> None:
        """End this worker between runs, for ``reason``; its pool, and its session if it has one, hear of the loss."""
        if self.state is not State.IDLE:
            return
        self.end_reason = reason
        self.kill()
        self._listener.worker_lost(self)

    def kill(self) -> None:
        """SIGKILL the worker's whole PID namespace and release every fd. Idempotent.

        One signal, to the namespace's init (the first pidfd; without PID
        namespaces the zygote hands the worker's own in its place): when
        the init dies, the kernel kills every other process of its
        namespace, the worker with it. A second signal, to the worker,
        would only cost this loop another system call that wakes a process.
        """
        if self.state is State.DEAD:
            return
        self.state = State.DEAD
        self._cancel_timer()
        if self._pidfds:
            try:
                signal.pidfd_send_signal(self._pidfds[0], signal.SIGKILL)
            except OSError:
                pass  # already gone
        self._close_fds()

    def _close_fds(self) -> None:
        if self._sock is not None:
            self._loop.remove_reader(self._sock.fileno())
            if self._tx:
                self._loop.remove_writer(self._sock.fileno())
            self._sock.close()
            self._sock = None
            self._tx.clear()
        for fd in self._pipes:
            self._loop.remove_reader(fd)
            os.close(fd)
        for fd in self._pidfds:
            os.close(fd)
        self._pipes, self._pidfds = [], []

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
