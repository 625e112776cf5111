"""Workflows: graphs of code nodes whose outputs feed each other's inputs.

Owns: the workflow definition (``WorkflowBuilder`` and the immutable,
validated ``Workflow`` it builds), the ``${name}`` templates of node
parameters, the walk of a connection's source path through a node's
outputs, and the scheduler that runs every node whose inputs are ready,
concurrently, through ``Sandbox.execute`` under one tenant's policy.

::

    wf = WorkflowBuilder()
    wf.add_node("AsyncPythonCodeNode", "fetch", {"code": "...", "user_id": "${uid}"})
    wf.add_node("PythonCodeNode", "report", {"code": "..."})
    wf.add_connection("fetch", "result.data", "report", "rows")
    results = await sb.run_workflow(wf.build(), parameters={"fetch": {"uid": 42}})
    results["report"]  # the outputs of node "report"

A node's inputs are, from lowest to highest precedence: its parameters other
than ``code`` (templates resolved), the caller's runtime parameters for it,
and the values connected into it. The most specific source wins: a parameter
is a default written into the definition, a runtime parameter is this run's
choice, and a connection is the graph's data flow, which a default or a
stray runtime value must not silently replace.

Why a node's ``code`` is never templated: a template's value comes from the
caller's runtime parameters or from another node's outputs, that is from
data, and often from code that is itself untrusted. Splicing it into source
would turn data into code (the injection hole of string-built SQL). Values
reach code only as variables, and a ``${x}`` inside code stays literal text.
For the same reason templates are resolved only in the parameters written
into the definition, in one pass: a value that arrives by connection or as a
runtime parameter is never scanned for templates, even when it contains
``${...}``.

Why values travel unchanged: the outputs ``Sandbox.execute`` returned are
passed on as they are. Decoded outputs are plain builtin data, which the next
run's input encoding turns back into the same values (tuples stay tuples,
int keys stay ints; there is no JSON round trip), and an ``Opaque`` is sent
as the very bytes its worker produced, to be rebuilt only inside the next
worker.

Must never: run a node's code anywhere but in a worker; template a node's
``code``; apply templates to a value that came from a worker or from the
caller's runtime parameters; decode, unpickle or otherwise interpret a value
beyond what ``Sandbox.execute`` already decoded (an ``Opaque`` travels on as
its bytes); start a node before every node it depends on has finished; or
leave a node running once ``run_workflow`` has returned or raised.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from sandbox.errors import CodeError, InputError, SandboxError, TimeLimitExceeded
from sandbox.inputs import check_name
from sandbox.opaque import Opaque
from sandbox.result import Result


class Executor(Protocol):
    """What runs a workflow's nodes: ``Sandbox`` and ``ClusterSandbox`` alike."""

    async def execute(
        self,
        code: str,
        inputs: Mapping[str, object] | None = None,
        *,
        tenant: str = ...,
        allow_await: bool = ...,
        filename: str = ...,
    ) -> Result: ...


# Node kind -> whether its code may use top-level ``await``.
NODE_KINDS: Mapping[str, bool] = {"PythonCodeNode": False, "AsyncPythonCodeNode": True}
CODE = "code"

_NODE_ID = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*$")
_TEMPLATE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
_INDEX = re.compile(r"^-?[0-9]+$")
_TOP_LEVEL_AWAIT_ERROR = "SyntaxError: 'await' outside function"  # the compiler's words for it
_MAX_LISTED = 10  # names shown in a message about worker data, which can hold any number of them


class WorkflowDefinitionError(SandboxError):
    """The workflow cannot run as defined: raised by ``build()``, and by
    ``run_workflow`` before any node has started (runtime parameters for an
    unknown node, a template naming a variable nothing provides)."""


class WorkflowError(SandboxError):
    """A node of a running workflow failed, or the workflow ran out of time.

    ``node`` is the failing node's id, ``cause`` the ``SandboxError`` it
    failed with (also ``__cause__``), and ``completed`` maps every node that
    had finished to its outputs. ``stdout``/``stderr`` are the failing node's.
    Its dependents never started, and nodes still running were stopped. When
    the workflow's ``timeout`` passed, ``node`` is the first node (in the
    order they were added) still running and ``cause`` a TimeLimitExceeded.
    """

    def __init__(
        self, message: str, *, node: str, cause: SandboxError, completed: dict[str, dict[str, object]]
    ) -> None:
        super().__init__(message, stdout=cause.stdout, stderr=cause.stderr)
        self.node = node
        self.cause = cause
        self.completed = completed


# --- definition --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Node:
    """One code node: its kind, its code, and its other parameters (templates unresolved).

    Node ids are restricted to letters, digits, ``_`` and ``-`` because they
    appear verbatim in tracebacks (``File "<node fetch>"``), in connection
    paths shown in messages, and as keys of ``parameters=``.
    """

    id: str
    kind: str
    code: str
    parameters: Mapping[str, object]

    def __post_init__(self) -> None:
        if not isinstance(self.id, str) or not _NODE_ID.match(self.id):
            raise WorkflowDefinitionError(
                f"node id {self.id!r} is not valid: use letters, digits, '_' and '-', starting with a letter or '_'"
            )
        if self.kind not in NODE_KINDS:
            raise WorkflowDefinitionError(
                f"node {self.id!r} has unknown kind {self.kind!r}; known kinds are {_listing(NODE_KINDS)}"
            )
        if not isinstance(self.code, str):
            raise WorkflowDefinitionError(
                f"node {self.id!r} needs a 'code' parameter holding its Python source "
                f"as a str (got {type(self.code).__name__})"
            )
        for name in self.parameters:
            _check_input_name(self.id, name, "parameter")

    @property
    def allow_await(self) -> bool:
        return NODE_KINDS[self.kind]

    @property
    def filename(self) -> str:
        """The name tracebacks and syntax errors give this node's code."""
        return f"<node {self.id}>"


@dataclass(frozen=True)
class Connection:
    """``source``'s output at ``path`` becomes input variable ``input`` of ``target``."""

    source: str
    path: tuple[str, ...]
    target: str
    input: str

    def __post_init__(self) -> None:
        if not self.path or not self.path[0].isidentifier() or not all(self.path):
            raise WorkflowDefinitionError(
                f"connection from {self.source!r} to {self.target!r}: source path {'.'.join(self.path)!r} is not "
                "valid; it names an output variable, then optionally keys or list indices separated by dots, "
                "e.g. 'result.data' or 'items.0'"
            )
        _check_input_name(self.target, self.input, "connected input")

    def __str__(self) -> str:
        return f"{self.source}.{'.'.join(self.path)} -> {self.target}.{self.input}"


@dataclass(frozen=True)
class Workflow:
    """A validated, acyclic graph of nodes, as built by ``WorkflowBuilder.build()``.

    Node, Connection and Workflow each validate themselves when constructed,
    so no invalid Workflow exists however it was made; and it is immutable,
    so one Workflow can run any number of times, concurrently, with different
    runtime parameters. ``by_id`` and ``incoming`` index the graph.
    """

    nodes: tuple[Node, ...]
    connections: tuple[Connection, ...]
    by_id: Mapping[str, Node] = field(init=False, repr=False)
    incoming: Mapping[str, tuple[Connection, ...]] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        by_id: dict[str, Node] = {}
        for node in self.nodes:
            if node.id in by_id:
                raise WorkflowDefinitionError(f"node id {node.id!r} is used twice; node ids must be unique")
            by_id[node.id] = node
        incoming: dict[str, list[Connection]] = {node_id: [] for node_id in by_id}
        for connection in self.connections:
            _check_connection_fits(connection, incoming)
            incoming[connection.target].append(connection)
        object.__setattr__(self, "by_id", by_id)
        object.__setattr__(self, "incoming", {node_id: tuple(c) for node_id, c in incoming.items()})
        _check_acyclic(self.incoming)

    def dependencies(self, node_id: str) -> set[str]:
        return {connection.source for connection in self.incoming[node_id]}

    def to_json(self) -> dict[str, list[dict[str, object]]]:
        """The JSON form of this workflow (what ``POST /v1/workflows`` takes)::

            {"nodes": [{"id": "fetch", "kind": "AsyncPythonCodeNode",
                        "parameters": {"code": "...", "user_id": "${uid}"}}],
             "connections": [{"source": "fetch", "source_path": "result.data",
                              "target": "report", "target_input": "rows"}]}

        The fields are ``WorkflowBuilder.add_node`` and ``add_connection``'s
        arguments. Parameter values are in the tagged form of
        ``sandbox.jsonform`` (plain JSON stands for itself; a tuple, bytes or
        a datetime is a ``{"$type": ...}`` object).
        """
        from sandbox.jsonform import encode

        return {
            "nodes": [
                {"id": node.id, "kind": node.kind, "parameters": encode({CODE: node.code, **node.parameters})}
                for node in self.nodes
            ],
            "connections": [
                {"source": c.source, "source_path": ".".join(c.path), "target": c.target, "target_input": c.input}
                for c in self.connections
            ],
        }

    @classmethod
    def from_json(cls, document: object) -> Workflow:
        """The Workflow whose JSON form is ``document`` (see ``to_json``), validated as ``build()`` validates.

        Raises WorkflowDefinitionError naming the field that is missing or malformed.
        """
        from sandbox.jsonform import JSONFormError, decode

        def entries(key: str, fields: tuple[str, ...]) -> list[dict[str, object]]:
            items = document.get(key, []) if isinstance(document, Mapping) else None
            if not isinstance(items, list):
                raise WorkflowDefinitionError(f"workflow.{key} must be a list")
            for index, item in enumerate(items):
                missing = [f for f in fields if not isinstance(item, Mapping) or f not in item]
                if missing:
                    raise WorkflowDefinitionError(f"workflow.{key}[{index}] needs the field {missing[0]!r}")
            return items

        builder = WorkflowBuilder()
        for index, node in enumerate(entries("nodes", ("id", "kind", "parameters"))):
            try:
                parameters = decode(node["parameters"], f"workflow.nodes[{index}].parameters")
            except JSONFormError as exc:
                raise WorkflowDefinitionError(str(exc)) from None
            builder.add_node(node["kind"], node["id"], parameters)  # type: ignore[arg-type]
        for c in entries("connections", ("source", "source_path", "target", "target_input")):
            builder.add_connection(c["source"], c["source_path"], c["target"], c["target_input"])  # type: ignore[arg-type]
        return builder.build()


class WorkflowBuilder:
    """Collects nodes and connections; ``build()`` checks them all at once.

    Why the checks wait for ``build()``: a definition is often generated, and
    connections may be added before the nodes they name. One place that sees
    the whole graph gives every mistake one clear message, including the ones
    only the whole graph reveals (cycles).
    """

    def __init__(self) -> None:
        self._nodes: list[tuple[str, str, object]] = []
        self._connections: list[tuple[str, str, str, str]] = []

    def add_node(self, kind: str, node_id: str, parameters: Mapping[str, object]) -> None:
        """Add a node of ``kind`` ("PythonCodeNode" or "AsyncPythonCodeNode").

        ``parameters`` holds ``code`` and any other parameter; each other one
        becomes an input variable of the code, after its ``${name}`` templates
        are resolved. The parameters are copied (down to their dicts, lists and
        tuples), so changing them later does not change the workflow.
        """
        self._nodes.append((kind, node_id, _copy_structure(parameters)))

    def add_connection(self, source: str, source_path: str, target: str, target_input: str) -> None:
        """Feed ``source``'s output at ``source_path`` to ``target`` as variable ``target_input``.

        The path starts with an output variable and walks into it with dots:
        ``result``, ``result.data``, ``stats.count``, ``items.0``.
        """
        self._connections.append((source, source_path, target, target_input))

    def build(self) -> Workflow:
        """The validated Workflow; raises WorkflowDefinitionError naming what is wrong."""
        nodes = tuple(_make_node(*spec) for spec in self._nodes)
        connections = tuple(
            Connection(source, _split_path(path), target, target_input)
            for source, path, target, target_input in self._connections
        )
        return Workflow(nodes, connections)


def _make_node(kind: str, node_id: str, parameters: object) -> Node:
    if not isinstance(parameters, Mapping):
        raise WorkflowDefinitionError(
            f"node {node_id!r}: parameters must be a mapping holding at least 'code', not {type(parameters).__name__}"
        )
    others = {name: value for name, value in parameters.items() if name != CODE}
    # Node reports a missing or non-str code; the builder's callers are not type-checked.
    return Node(node_id, kind, parameters.get(CODE), others)  # type: ignore[arg-type]


def _split_path(source_path: object) -> tuple[str, ...]:
    return tuple(source_path.split(".")) if isinstance(source_path, str) else ()


def _check_connection_fits(connection: Connection, incoming: Mapping[str, list[Connection]]) -> None:
    for end in (connection.source, connection.target):
        if end not in incoming:
            raise WorkflowDefinitionError(
                f"connection {connection} names unknown node {end!r}; the nodes are {_listing(incoming)}"
            )
    for earlier in incoming[connection.target]:
        if earlier.input == connection.input:
            raise WorkflowDefinitionError(
                f"input {connection.input!r} of node {connection.target!r} is fed by "
                f"two connections ({earlier} and {connection}); keep one"
            )


def _check_input_name(node_id: str, name: object, role: str) -> None:
    """Every parameter, runtime parameter and connected input becomes a variable of the code."""
    if name == CODE:
        raise WorkflowDefinitionError(
            f"node {node_id!r}: a {role} named 'code' would replace the node's code; "
            "a node's code is fixed by add_node and is never an input"
        )
    try:
        check_name(name)
    except InputError as exc:
        raise WorkflowDefinitionError(
            f"node {node_id!r}: {role} {name!r} cannot become a variable: {exc.message}"
        ) from None


def _check_acyclic(incoming: Mapping[str, tuple[Connection, ...]]) -> None:
    """Raise naming one cycle if the connections have any.

    Kahn's algorithm peels off nodes whose sources are all peeled; what is
    left has, for every node, a source that is also left, so following those
    sources backwards from any of them must come round to a node seen before.
    """
    waiting = {node_id: {c.source for c in connections} for node_id, connections in incoming.items()}
    ready = [node_id for node_id, sources in waiting.items() if not sources]
    while ready:
        done = ready.pop()
        del waiting[done]
        for node_id, sources in waiting.items():
            if done in sources:
                sources.discard(done)
                if not sources:
                    ready.append(node_id)
    if not waiting:
        return
    trail = [next(iter(waiting))]
    while trail.count(trail[-1]) < 2:
        trail.append(min(waiting[trail[-1]]))
    cycle = trail[trail.index(trail[-1]) :]
    raise WorkflowDefinitionError(
        f"connections form a cycle: {' -> '.join(reversed(cycle))}; a workflow must be acyclic"
    )


# --- templates ---------------------------------------------------------------------------------------------


def _map_strings(value: object, convert: Callable[[str], object]) -> object:
    """``value`` rebuilt with ``convert`` applied to every str inside its dicts, lists and tuples.

    Only those exact types are walked; anything else (a caller's own object,
    a str subclass) is a value, not a template. Dict keys are left alone:
    they are names chosen by whoever wrote the workflow, not values. Whatever
    ``convert`` returns is not walked again, so a template's value is never
    itself treated as a template.
    """
    if type(value) is str:
        return convert(value)
    if type(value) is dict:
        return {key: _map_strings(item, convert) for key, item in value.items()}
    if type(value) is list:
        return [_map_strings(item, convert) for item in value]
    if type(value) is tuple:
        return tuple(_map_strings(item, convert) for item in value)
    return value


def _copy_structure(parameters: object) -> object:
    if not isinstance(parameters, Mapping):
        return parameters  # build() reports it
    return {name: _map_strings(value, lambda text: text) for name, value in parameters.items()}


def _template_names(value: object) -> set[str]:
    names: set[str] = set()

    def collect(text: str) -> str:
        names.update(_TEMPLATE.findall(text))
        return text

    _map_strings(value, collect)
    return names


def _resolve(node_id: str, parameter: str, value: object, variables: Mapping[str, object]) -> object:
    """``value`` with its templates replaced from ``variables``.

    An exact ``"${x}"`` becomes the value of ``x`` itself, of whatever type,
    so numbers, dicts and ``Opaque`` handles pass through unchanged. A
    template inside longer text is replaced by ``str`` of the value, which
    the host can do safely only for decoded data: an Opaque is refused
    rather than formatted, since its text would be a host-side label, not
    the worker's value.
    """

    def format_value(match: re.Match[str]) -> str:
        name = match.group(1)
        item = variables[name]
        if isinstance(item, Opaque):
            raise InputError(
                f"node {node_id!r}, parameter {parameter!r}: '${{{name}}}' is embedded in text, but "
                f"{name!r} is an opaque {item.type_name} value the host never formats; "
                f'use the exact form "${{{name}}}" to pass the value itself'
            )
        try:
            return str(item)
        except Exception as exc:  # a caller's own object, or an int too long to print
            raise InputError(
                f"node {node_id!r}, parameter {parameter!r}: {name!r} cannot be formatted into "
                f"text: {type(exc).__name__}: {exc}"
            ) from exc

    def convert(text: str) -> object:
        exact = _TEMPLATE.fullmatch(text)
        if exact:
            return variables[exact.group(1)]
        return _TEMPLATE.sub(format_value, text)

    return _map_strings(value, convert)


def _check_templates(workflow: Workflow, runtime: Mapping[str, Mapping[str, object]]) -> None:
    """Every template must name a runtime parameter or a connected input of its node."""
    for node in workflow.nodes:
        available = set(runtime.get(node.id, {})) | {c.input for c in workflow.incoming[node.id]}
        for parameter, value in node.parameters.items():
            missing = sorted(_template_names(value) - available)
            if missing:
                raise WorkflowDefinitionError(
                    f"node {node.id!r}, parameter {parameter!r}: template variable {missing[0]!r} is not defined; "
                    f"pass it as parameters={{{node.id!r}: {{{missing[0]!r}: ...}}}} or connect an output to "
                    f"input {missing[0]!r} of {node.id!r}"
                )


def _runtime_parameters(workflow: Workflow, parameters: object) -> dict[str, Mapping[str, object]]:
    """The caller's per-node runtime parameters, checked; they are input data and never templated."""
    if parameters is None:
        return {}
    if not isinstance(parameters, Mapping):
        raise WorkflowDefinitionError(
            f"parameters must map node ids to mappings of input values, not {type(parameters).__name__}"
        )
    for node_id, values in parameters.items():
        if node_id not in workflow.by_id:
            raise WorkflowDefinitionError(
                f"parameters are given for unknown node {node_id!r}; the nodes are {_listing(workflow.by_id)}"
            )
        if not isinstance(values, Mapping):
            raise WorkflowDefinitionError(
                f"parameters for node {node_id!r} must be a mapping of input values, not {type(values).__name__}"
            )
        for name in values:
            _check_input_name(node_id, name, "runtime parameter")
    return dict(parameters)


# --- connections -------------------------------------------------------------------------------------------


def _follow(connection: Connection, source: Result) -> object:
    """The value at ``connection.path`` in ``source``'s outputs.

    The walk reads only what ``Sandbox.execute`` already decoded: dict keys
    (a digit step also matches an int key) and list or tuple indices. It
    never walks into an Opaque, which the host does not decode.
    """
    root = connection.path[0]
    if root not in source.outputs:
        reason = source.skipped.get(root)
        why = f"{root!r} was not exported ({reason})" if reason else f"its outputs are {_listing(source.outputs)}"
        raise InputError(f"connection {connection}: node {connection.source!r} has no output {root!r}; {why}")
    value = source.outputs[root]
    for depth, step in enumerate(connection.path[1:], start=1):
        value = _step(connection, ".".join(connection.path[:depth]), value, step)
    return value


def _step(connection: Connection, walked: str, value: object, step: str) -> object:
    def missing(detail: str) -> InputError:
        return InputError(f"connection {connection}: {connection.source!r} has no {walked}.{step}; {detail}")

    if isinstance(value, dict):
        for key in (step, int(step)) if _INDEX.match(step) else (step,):
            if key in value:
                return value[key]
        raise missing(f"{walked!r} is a dict with keys {_listing(value)}")
    if isinstance(value, (list, tuple)):
        if not _INDEX.match(step):
            raise missing(f"{walked!r} is a {type(value).__name__}, so the step must be an index, not {step!r}")
        if not -len(value) <= int(step) < len(value):
            raise missing(f"{walked!r} has {len(value)} items")
        return value[int(step)]
    if isinstance(value, Opaque):
        raise missing(
            f"{walked!r} is an opaque {value.type_name} value, which the host never decodes; connect "
            f"{walked!r} whole and read it inside {connection.target!r}"
        )
    raise missing(f"{walked!r} is a {type(value).__name__}, which has no keys or items")


# --- execution ---------------------------------------------------------------------------------------------


class _WorkflowRun:
    """One run of a workflow: which nodes finished, and which are running.

    Why fail fast: once a node has failed, the workflow's outcome is that
    failure. Its dependents cannot run, and nodes still running are
    cancelled (the supervisor kills their workers) rather than left to spend
    the tenant's workers and quota on a result nobody will receive, as
    ``asyncio.TaskGroup`` does with its tasks.
    """

    def __init__(
        self, sandbox: Executor, workflow: Workflow, runtime: Mapping[str, Mapping[str, object]], tenant: str
    ) -> None:
        self.sandbox = sandbox
        self.workflow = workflow
        self.runtime = runtime
        self.tenant = tenant
        self.position = {node.id: index for index, node in enumerate(workflow.nodes)}
        self.finished: dict[str, Result] = {}
        self.running: dict[asyncio.Task[Result], str] = {}

    def completed(self) -> dict[str, dict[str, object]]:
        return {
            node_id: self.finished[node_id].outputs for node_id in sorted(self.finished, key=self.position.__getitem__)
        }

    async def execute(self, timeout: float | None) -> dict[str, dict[str, object]]:
        """Run every node; return their outputs in definition order.

        Why one deadline for the whole workflow rather than a shorter
        ``timeout=`` per node: a node may wait in the tenant's queue for a
        worker, and a per-run timeout only starts once it runs. Cancelling
        the node tasks at the deadline ends queued and running nodes alike;
        each node stays bound by its tenant's ``wall_time_s`` as well.
        """
        try:
            async with asyncio.timeout(timeout) as scope:
                await self._drive()
        except TimeoutError:
            if timeout is None or not scope.expired():
                raise
            error = self._timed_out(timeout)
            raise error from error.cause
        finally:
            await self._cancel_running()
        return self.completed()

    async def _drive(self) -> None:
        while len(self.finished) < len(self.workflow.nodes):
            self._start_ready_nodes()
            done, _ = await asyncio.wait(self.running, return_when=asyncio.FIRST_COMPLETED)
            self._collect(done)

    def _start_ready_nodes(self) -> None:
        started = set(self.finished) | set(self.running.values())
        for node in self.workflow.nodes:
            if node.id not in started and self.workflow.dependencies(node.id) <= self.finished.keys():
                self.running[asyncio.create_task(self._run_node(node))] = node.id

    def _collect(self, done: Iterable[asyncio.Task[Result]]) -> None:
        """Record the nodes that finished, then raise for the first one (in definition order) that failed.

        Successes are recorded first so that ``WorkflowError.completed`` holds
        every node that finished, including ones that finished together with
        the failing node.
        """
        failures: list[tuple[str, SandboxError]] = []
        for task in sorted(done, key=lambda task: self.position[self.running[task]]):
            node_id = self.running.pop(task)
            if isinstance(error := task.exception(), SandboxError):
                failures.append((node_id, error))
            else:
                self.finished[node_id] = task.result()  # re-raises anything that is not a SandboxError
        if failures:
            node_id, cause = failures[0]
            error = self._failed(node_id, cause)
            raise error from cause

    async def _run_node(self, node: Node) -> Result:
        inputs = self._inputs(node)
        return await self.sandbox.execute(
            node.code, inputs, tenant=self.tenant, allow_await=node.allow_await, filename=node.filename
        )

    def _inputs(self, node: Node) -> dict[str, object]:
        """Parameters with templates resolved, overridden by runtime parameters, then by connected values."""
        variables = dict(self.runtime.get(node.id, {}))
        variables.update({c.input: _follow(c, self.finished[c.source]) for c in self.workflow.incoming[node.id]})
        inputs = {name: _resolve(node.id, name, value, variables) for name, value in node.parameters.items()}
        inputs.update(variables)
        return inputs

    def _failed(self, node_id: str, cause: SandboxError) -> WorkflowError:
        node = self.workflow.by_id[node_id]
        message = f"node {node_id!r} ({node.kind}) failed: {str(cause).rstrip()}"
        if not node.allow_await and isinstance(cause, CodeError) and _TOP_LEVEL_AWAIT_ERROR in cause.remote_message:
            message += f"\n{node.kind} runs synchronous code; use AsyncPythonCodeNode for top-level await"
        return WorkflowError(message, node=node_id, cause=cause, completed=self.completed())

    def _timed_out(self, timeout: float) -> WorkflowError:
        running = sorted(self.running.values(), key=self.position.__getitem__)
        cause = TimeLimitExceeded(f"workflow exceeded its time limit of {timeout:g} s", kind="wall", limit_s=timeout)
        message = (
            f"workflow exceeded its time limit of {timeout:g} s while {_listing(running)} "
            f"{'was' if len(running) == 1 else 'were'} still running; the running nodes were stopped"
        )
        return WorkflowError(message, node=running[0], cause=cause, completed=self.completed())

    async def _cancel_running(self) -> None:
        """Cancel every node still running and wait until each has stopped (its worker killed)."""
        tasks = list(self.running)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.running.clear()


async def run_workflow(
    sandbox: Executor,
    workflow: Workflow,
    parameters: Mapping[str, Mapping[str, object]] | None = None,
    *,
    tenant: str = "default",
    timeout: float | None = None,
) -> dict[str, dict[str, object]]:
    """Run ``workflow`` on ``sandbox`` under ``tenant``'s policy; return each node's outputs by node id.

    ``parameters`` maps node ids to extra input variables for that node.
    ``timeout`` bounds the whole workflow in seconds (each node is also bound
    by its tenant's ``wall_time_s``). Everything that can be checked without
    running code is checked first (WorkflowDefinitionError); a node that fails
    ends the run with WorkflowError.
    """
    if not isinstance(workflow, Workflow):
        raise WorkflowDefinitionError(
            f"run_workflow needs the Workflow returned by WorkflowBuilder.build(), not {type(workflow).__name__}"
        )
    if timeout is not None and not (isinstance(timeout, (int, float)) and timeout > 0):
        raise InputError(f"timeout must be a positive number of seconds, not {timeout!r}")
    runtime = _runtime_parameters(workflow, parameters)
    _check_templates(workflow, runtime)
    return await _WorkflowRun(sandbox, workflow, runtime, tenant).execute(timeout)


def _listing(names: Iterable[object]) -> str:
    shown = [_label(name) for name, _ in zip(names, range(_MAX_LISTED + 1), strict=False)]
    if len(shown) > _MAX_LISTED:
        shown[-1] = "..."
    return ", ".join(shown) if shown else "(none)"


def _label(name: object) -> str:
    """A short repr of a name that may come from a worker's data."""
    try:
        return repr(name[:60] if isinstance(name, str) else name)[:60]
    except ValueError:  # an int too long to print
        return f"<{type(name).__name__}>"
