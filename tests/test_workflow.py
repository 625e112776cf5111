"""Workflows: definition checks, templates, connections, concurrency, failures, and compatibility patterns."""

from __future__ import annotations

import asyncio
import datetime
import textwrap
import time

import pytest
import pytest_asyncio

from sandbox import (
    CodeError,
    InputError,
    Opaque,
    PolicyViolation,
    Sandbox,
    TimeLimitExceeded,
    Workflow,
    WorkflowBuilder,
    WorkflowDefinitionError,
    WorkflowError,
)
from tests.conftest import quick_policy

SYNC, ASYNC = "PythonCodeNode", "AsyncPythonCodeNode"
in_module_loop = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def sb():
    """Four workers, so that independent nodes can really run side by side."""
    tenants = {"strict": quick_policy(allowed_modules=["asyncio"])}
    async with Sandbox(quick_policy(), tenants=tenants, workers=4) as sandbox:
        yield sandbox


def build(nodes: dict[str, tuple[str, dict]], *connections: tuple[str, str, str, str]) -> Workflow:
    builder = WorkflowBuilder()
    for node_id, (kind, parameters) in nodes.items():
        builder.add_node(kind, node_id, parameters)
    for connection in connections:
        builder.add_connection(*connection)
    return builder.build()


def code(source: str) -> str:
    return textwrap.dedent(source).strip()


# --- definition ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "nodes, connections, message",
    [
        ({"a": ("ShellNode", {"code": ""})}, [], "node 'a' has unknown kind 'ShellNode'; known kinds are"),
        ({"a": (SYNC, {"code": ""})}, [("a", "x", "b", "y")], "connection a.x -> b.y names unknown node 'b'"),
        ({"a": (SYNC, {"code": ""})}, [("ghost", "x", "a", "y")], "names unknown node 'ghost'; the nodes are 'a'"),
        (
            {n: (SYNC, {"code": ""}) for n in "abc"},
            [("a", "x", "b", "x"), ("b", "x", "c", "x"), ("c", "x", "a", "x")],
            "connections form a cycle: a -> b -> c -> a",
        ),
        ({"a": (SYNC, {"code": ""})}, [("a", "x", "a", "y")], "connections form a cycle: a -> a"),
        (
            {"a": (SYNC, {"code": ""}), "b": (SYNC, {"code": ""})},
            [("a", "x", "b", "y"), ("a", "z", "b", "y")],
            "input 'y' of node 'b' is fed by two connections",
        ),
        (
            {"a": (SYNC, {"code": ""}), "b": (SYNC, {"code": ""})},
            [("a", "x", "b", "code")],
            "a connected input named 'code' would replace the node's code",
        ),
        (
            {"a": (SYNC, {"code": ""}), "b": (SYNC, {"code": ""})},
            [("a", "result..data", "b", "y")],
            "source path 'result..data' is not valid",
        ),
        ({"a": (SYNC, {"user_id": 1})}, [], "node 'a' needs a 'code' parameter"),
        ({"a": (SYNC, {"code": "", "user-id": 1})}, [], "parameter 'user-id' cannot become a variable"),
        ({"a b": (SYNC, {"code": ""})}, [], "node id 'a b' is not valid"),
    ],
)
def test_build_rejects_definition_mistakes(nodes, connections, message):
    with pytest.raises(WorkflowDefinitionError) as info:
        build(nodes, *connections)
    assert message in str(info.value)


def test_node_ids_must_be_unique():
    builder = WorkflowBuilder()
    builder.add_node(SYNC, "a", {"code": ""})
    builder.add_node(ASYNC, "a", {"code": ""})
    with pytest.raises(WorkflowDefinitionError, match="node id 'a' is used twice"):
        builder.build()


def test_builder_keeps_its_own_copy_of_the_parameters():
    parameters = {"code": "", "config": {"tags": ["x"]}}
    builder = WorkflowBuilder()
    builder.add_node(SYNC, "a", parameters)
    parameters["config"]["tags"].append("changed later")
    assert builder.build().by_id["a"].parameters == {"config": {"tags": ["x"]}}


@in_module_loop
async def test_missing_template_variable_fails_before_any_node_runs(sb):
    workflow = build(
        {
            "boom": (SYNC, {"code": "raise RuntimeError('must not run')"}),
            "fetch": (ASYNC, {"code": "pass", "query": {"filters": ["id=${user_id}"]}}),
        }
    )
    with pytest.raises(WorkflowDefinitionError) as info:
        await sb.run_workflow(workflow, parameters={"fetch": {"uid": 1}})
    message = str(info.value)
    assert "node 'fetch', parameter 'query': template variable 'user_id' is not defined" in message
    assert "parameters={'fetch': {'user_id': ...}}" in message


@in_module_loop
@pytest.mark.parametrize(
    "parameters, message",
    [
        ({"nope": {"x": 1}}, "parameters are given for unknown node 'nope'; the nodes are 'a'"),
        ({"a": {"code": "x = 1"}}, "a runtime parameter named 'code' would replace the node's code"),
        ({"a": {"not valid": 1}}, "runtime parameter 'not valid' cannot become a variable"),
    ],
)
async def test_bad_runtime_parameters_are_refused_before_running(sb, parameters, message):
    with pytest.raises(WorkflowDefinitionError) as info:
        await sb.run_workflow(build({"a": (SYNC, {"code": "y = 1"})}), parameters=parameters)
    assert message in str(info.value)


# --- parameters and templates ------------------------------------------------------------------------------


@in_module_loop
async def test_spec_example_async_fetch_feeds_sync_report(sb):
    workflow = build(
        {
            "fetch": (
                ASYNC,
                {
                    "user_id": "${uid}",
                    "code": code("""
            await asyncio.sleep(0.01)
            result = {"data": [{"user": user_id, "amount": a} for a in (5, 7)], "count": 2}
        """),
                },
            ),
            "report": (
                SYNC,
                {"code": "total = sum(row['amount'] for row in rows)\nusers = {row['user'] for row in rows}"},
            ),
        },
        ("fetch", "result.data", "report", "rows"),
    )
    results = await sb.run_workflow(workflow, parameters={"fetch": {"uid": 42}}, tenant="default")
    assert results["fetch"] == {"result": {"data": [{"user": 42, "amount": 5}, {"user": 42, "amount": 7}], "count": 2}}
    assert results["report"] == {"total": 12, "users": {42}}


@in_module_loop
async def test_exact_templates_keep_their_type_and_embedded_ones_are_formatted(sb):
    workflow = build(
        {
            "a": (
                SYNC,
                {
                    "code": "seen = (count, label, nested)\ncount_type = type(count).__name__",
                    "count": "${n}",
                    "label": "n=${n}, cfg=${cfg}",
                    "nested": {"list": ["${n}", "id-${n}", {"deep": "${cfg}"}], "pair": ("${n}", "${n}"), "plain": 1.5},
                },
            )
        }
    )
    results = await sb.run_workflow(workflow, parameters={"a": {"n": 3, "cfg": {"k": [1]}}})
    count, label, nested = results["a"]["seen"]
    assert count == 3 and results["a"]["count_type"] == "int"
    assert label == "n=3, cfg={'k': [1]}"
    assert nested == {"list": [3, "id-3", {"deep": {"k": [1]}}], "pair": (3, 3), "plain": 1.5}


@in_module_loop
async def test_code_is_never_templated(sb):
    workflow = build({"a": (SYNC, {"code": 'text = "${uid}"\ndoubled = uid * 2'})})
    results = await sb.run_workflow(workflow, parameters={"a": {"uid": 21}})
    assert results["a"] == {"text": "${uid}", "doubled": 42}


@in_module_loop
async def test_templates_resolve_from_connected_values_but_never_inside_them(sb):
    workflow = build(
        {
            "upstream": (SYNC, {"code": 'name = "${secret}"\ncount = 2'}),
            "downstream": (
                SYNC,
                {"code": "seen = (greeting, same, name)", "greeting": "hello ${name} x${count}", "same": "${name}"},
            ),
        },
        ("upstream", "name", "downstream", "name"),
        ("upstream", "count", "downstream", "count"),
    )
    results = await sb.run_workflow(workflow, parameters={"downstream": {"secret": "LEAKED"}})
    assert results["downstream"]["seen"] == ("hello ${secret} x2", "${secret}", "${secret}")


@in_module_loop
async def test_parameters_then_runtime_parameters_then_connections_take_precedence(sb):
    workflow = build(
        {
            "source": (SYNC, {"code": "value = 'connected'"}),
            "target": (SYNC, {"code": "seen = (a, b, c)", "a": "static", "b": "static", "c": "static"}),
        },
        ("source", "value", "target", "c"),
    )
    results = await sb.run_workflow(workflow, parameters={"target": {"b": "runtime", "c": "runtime"}})
    assert results["target"]["seen"] == ("static", "runtime", "connected")


# --- connections -------------------------------------------------------------------------------------------


@in_module_loop
async def test_connection_paths_walk_keys_and_indices_and_values_keep_their_types(sb):
    workflow = build(
        {
            "source": (
                SYNC,
                {
                    "code": code("""
            import datetime
            result = {"data": [10, 20], "stats": {"count": 2}}
            items = [(1, "a"), (2, "b")]
            by_id = {7: "seven"}
            stamp = datetime.date(2024, 1, 2)
        """)
                },
            ),
            "left": (SYNC, {"code": "seen = (rows, count, first, last_name, seven, stamp, type(first).__name__)"}),
            "right": (SYNC, {"code": "total = sum(rows)"}),
        },
        ("source", "result.data", "left", "rows"),
        ("source", "result.stats.count", "left", "count"),
        ("source", "items.0", "left", "first"),
        ("source", "items.-1.1", "left", "last_name"),
        ("source", "by_id.7", "left", "seven"),
        ("source", "stamp", "left", "stamp"),
        ("source", "result.data", "right", "rows"),
    )
    results = await sb.run_workflow(workflow)
    assert results["left"]["seen"] == ([10, 20], 2, (1, "a"), "b", "seven", datetime.date(2024, 1, 2), "tuple")
    assert results["right"] == {"total": 30}


@in_module_loop
@pytest.mark.parametrize(
    "path, message",
    [
        (
            "result.rows",
            "connection fetch.result.rows -> use.x: 'fetch' has no result.rows; 'result' is a dict with keys 'data'",
        ),
        ("result.data.5", "'fetch' has no result.data.5; 'result.data' has 2 items"),
        ("result.data.first", "'result.data' is a list, so the step must be an index, not 'first'"),
        ("missing", "node 'fetch' has no output 'missing'; its outputs are 'result', 'point'"),
        ("helper", "node 'fetch' has no output 'helper'; 'helper' was not exported (function)"),
        ("point.x", "'point' is an opaque __main__.Point value, which the host never decodes"),
    ],
)
async def test_a_missing_connection_path_names_the_nodes_and_the_path(sb, path, message):
    workflow = build(
        {
            "fetch": (
                SYNC,
                {
                    "code": code("""
            class Point:
                x = 1
            def helper():
                pass
            result = {"data": [1, 2]}
            point = Point()
        """)
                },
            ),
            "use": (SYNC, {"code": "y = x"}),
        },
        ("fetch", path, "use", "x"),
    )
    with pytest.raises(WorkflowError) as info:
        await sb.run_workflow(workflow)
    error = info.value
    assert error.node == "use" and isinstance(error.cause, InputError)
    assert message in str(error)
    assert error.completed["fetch"]["result"] == {"data": [1, 2]} and "use" not in error.completed


@in_module_loop
async def test_opaque_values_travel_to_the_next_node_as_the_worker_produced_them(sb):
    workflow = build(
        {
            "make": (
                SYNC,
                {
                    "code": code("""
            class Point:
                def __init__(self, x, y):
                    self.x, self.y = x, y
                def norm(self):
                    return (self.x ** 2 + self.y ** 2) ** 0.5
            point = Point(3, 4)
        """)
                },
            ),
            "use": (SYNC, {"code": "lengths = (p.norm(), q.norm())", "q": "${p}"}),
        },
        ("make", "point", "use", "p"),
    )
    results = await sb.run_workflow(workflow)
    assert isinstance(results["make"]["point"], Opaque)
    assert results["use"] == {"lengths": (5.0, 5.0)}


@in_module_loop
async def test_an_opaque_value_is_never_formatted_into_text(sb):
    workflow = build(
        {
            "make": (SYNC, {"code": "class Box:\n    pass\nbox = Box()"}),
            "use": (SYNC, {"code": "pass", "label": "box: ${box}"}),
        },
        ("make", "box", "use", "box"),
    )
    with pytest.raises(WorkflowError) as info:
        await sb.run_workflow(workflow)
    assert info.value.node == "use" and isinstance(info.value.cause, InputError)
    assert "'${box}' is embedded in text, but 'box' is an opaque __main__.Box value" in str(info.value)


# --- execution ---------------------------------------------------------------------------------------------


@in_module_loop
async def test_await_in_a_sync_node_is_an_error_naming_the_node_and_line(sb):
    workflow = build({"report": (SYNC, {"code": "rows = [1, 2]\ntotal = await asyncio.sleep(0, sum(rows))"})})
    with pytest.raises(WorkflowError) as info:
        await sb.run_workflow(workflow)
    error = info.value
    assert error.node == "report" and isinstance(error.cause, CodeError)
    assert error.cause.type_name == "SyntaxError"
    assert 'File "<node report>", line 2' in error.cause.traceback
    assert "use AsyncPythonCodeNode for top-level await" in str(error)


@in_module_loop
async def test_a_failing_node_stops_its_dependents_and_keeps_finished_outputs(sb):
    workflow = build(
        {
            "load": (SYNC, {"code": "rows = [1, 2, 3]"}),
            "check": (SYNC, {"code": "print('checking')\nif len(rows) > 2:\n    raise ValueError('too many rows')"}),
            "store": (SYNC, {"code": "stored = True"}),
        },
        ("load", "rows", "check", "rows"),
        ("check", "rows", "store", "rows"),
    )
    with pytest.raises(WorkflowError) as info:
        await sb.run_workflow(workflow)
    error = info.value
    assert error.node == "check" and error.cause is error.__cause__
    assert error.cause.type_name == "ValueError" and 'File "<node check>", line 3' in str(error)
    assert error.completed == {"load": {"rows": [1, 2, 3]}}
    assert error.stdout == "checking\n"


@in_module_loop
async def test_nodes_run_under_the_tenants_policy(sb):
    workflow = build({"a": (SYNC, {"code": "import json\ntext = json.dumps([1])"})})
    assert (await sb.run_workflow(workflow, tenant="default"))["a"] == {"text": "[1]"}
    with pytest.raises(WorkflowError) as info:
        await sb.run_workflow(workflow, tenant="strict")
    assert isinstance(info.value.cause, PolicyViolation) and info.value.cause.tenant == "strict"


@in_module_loop
async def test_independent_nodes_run_concurrently(sb):
    workflow = build(
        {
            "slow_sync": (SYNC, {"code": "import time\ntime.sleep(1)\nleft = 1"}),
            "slow_async": (ASYNC, {"code": "await asyncio.sleep(1)\nright = 2"}),
            "join": (SYNC, {"code": "total = left + right"}),
        },
        ("slow_sync", "left", "join", "left"),
        ("slow_async", "right", "join", "right"),
    )
    start = time.monotonic()
    results = await sb.run_workflow(workflow)
    elapsed = time.monotonic() - start
    assert results["join"] == {"total": 3}
    assert elapsed < 1.8, f"two independent 1 s nodes took {elapsed:.2f} s: they ran one after the other"


@in_module_loop
async def test_one_workflow_can_run_concurrently_with_different_parameters(sb):
    workflow = build({"a": (SYNC, {"code": "doubled = n * 2", "n": "${value}"})})
    runs = await asyncio.gather(*(sb.run_workflow(workflow, parameters={"a": {"value": v}}) for v in range(4)))
    assert [r["a"]["doubled"] for r in runs] == [0, 2, 4, 6]


@in_module_loop
async def test_workflow_timeout_stops_the_running_nodes(sb):
    workflow = build(
        {
            "quick": (SYNC, {"code": "ready = True"}),
            "stuck": (SYNC, {"code": "import time\ntime.sleep(30)"}),
            "after": (SYNC, {"code": "done = True"}),
        },
        ("quick", "ready", "stuck", "ready"),
        ("stuck", "ready", "after", "ready"),
    )
    start = time.monotonic()
    with pytest.raises(WorkflowError) as info:
        await sb.run_workflow(workflow, timeout=1)
    assert time.monotonic() - start < 4
    error = info.value
    assert error.node == "stuck" and isinstance(error.cause, TimeLimitExceeded) and error.cause.limit_s == 1
    assert "workflow exceeded its time limit of 1 s while 'stuck' was still running" in str(error)
    assert error.completed == {"quick": {"ready": True}}
    assert (await sb.run("x = 1")).outputs == {"x": 1}


# --- compatibility patterns ----------------------------------------------------------------------------------


@in_module_loop
async def test_multi_output_node_feeds_several_inputs(sb):
    workflow = build(
        {
            "process": (
                SYNC,
                {
                    "code": code("""
            processed_data = [{"value": v * 10} for v in raw]
            item_count = len(processed_data)
            total_value = sum(item["value"] for item in processed_data)
        """),
                    "raw": [1, 2, 3],
                },
            ),
            "summarize": (SYNC, {"code": "summary = f'{count} items, total {total}, first {data[0]}'"}),
        },
        ("process", "processed_data", "summarize", "data"),
        ("process", "item_count", "summarize", "count"),
        ("process", "total_value", "summarize", "total"),
    )
    results = await sb.run_workflow(workflow)
    assert results["process"]["item_count"] == 3 and results["process"]["total_value"] == 60
    assert results["summarize"] == {"summary": "3 items, total 60, first {'value': 10}"}


@in_module_loop
async def test_legacy_result_from_an_awaited_function(sb):
    workflow = build(
        {
            "legacy": (
                ASYNC,
                {
                    "code": code("""
            async def process():
                await asyncio.sleep(0.01)
                return {"data": [1, 2, 3], "count": 3}
            result = await process()
        """)
                },
            ),
            "consume": (SYNC, {"code": "ok = len(data) == count\nresult = sum(data)"}),
        },
        ("legacy", "result.data", "consume", "data"),
        ("legacy", "result.count", "consume", "count"),
    )
    results = await sb.run_workflow(workflow)
    assert results["legacy"] == {"result": {"data": [1, 2, 3], "count": 3}}
    assert results["consume"] == {"ok": True, "result": 6}


@in_module_loop
async def test_gather_over_coroutines_defined_in_the_node(sb):
    workflow = build(
        {
            "fan": (
                ASYNC,
                {
                    "code": code("""
        async def square(v):
            await asyncio.sleep(0.01)
            return v * v
        squares = await asyncio.gather(*(square(v) for v in values))
    """),
                    "values": [1, 2, 3, 4],
                },
            )
        }
    )
    assert (await sb.run_workflow(workflow))["fan"] == {"squares": [1, 4, 9, 16]}


@in_module_loop
async def test_create_task_and_await_it_with_a_runtime_input(sb):
    workflow = build(
        {
            "user": (
                ASYNC,
                {
                    "code": code("""
            async def fetch_user(uid):
                await asyncio.sleep(0.01)
                return {"id": uid, "name": f"user-{uid}"}
            task = asyncio.create_task(fetch_user(user_id))
            user = await task
        """)
                },
            ),
            "greet": (SYNC, {"code": "greeting = 'hello ' + name"}),
        },
        ("user", "user.name", "greet", "name"),
    )
    results = await sb.run_workflow(workflow, parameters={"user": {"user_id": 7}})
    assert results["user"] == {"user": {"id": 7, "name": "user-7"}}
    assert results["greet"] == {"greeting": "hello user-7"}


@in_module_loop
async def test_optional_inputs_with_name_error_and_locals_checks(sb):
    workflow = build(
        {
            "opt": (
                SYNC,
                {
                    "code": code("""
        try:
            limit = max_items
        except NameError:
            limit = 10
        try:
            missing_lookup = {}["key"]
        except KeyError:
            missing_lookup = None
        mode = "custom" if "threshold" in locals() else "default"
    """)
                },
            )
        }
    )
    bare = await sb.run_workflow(workflow)
    given = await sb.run_workflow(workflow, parameters={"opt": {"max_items": 3, "threshold": 0.5}})
    assert bare["opt"] == {"limit": 10, "missing_lookup": None, "mode": "default"}
    assert given["opt"] == {"limit": 3, "missing_lookup": None, "mode": "custom"}


@in_module_loop
async def test_module_level_semaphore_limits_a_hundred_gathered_coroutines(sb):
    workflow = build(
        {
            "limited": (
                ASYNC,
                {
                    "code": code("""
            sem = asyncio.Semaphore(5)
            active = 0
            peak = 0
            async def work(i):
                global active, peak
                async with sem:
                    active += 1
                    peak = max(peak, active)
                    await asyncio.sleep(0.001)
                    active -= 1
                    return i * 2
            results = await asyncio.gather(*(work(i) for i in range(100)))
        """)
                },
            ),
            "total": (SYNC, {"code": "total = sum(values)"}),
        },
        ("limited", "results", "total", "values"),
    )
    results = await sb.run_workflow(workflow)
    assert results["limited"]["peak"] == 5 and "sem" not in results["limited"]
    assert results["total"] == {"total": 9900}


@in_module_loop
async def test_gather_of_coroutines_that_catch_their_own_exceptions(sb):
    workflow = build(
        {
            "safe": (
                ASYNC,
                {
                    "code": code("""
        async def attempt(i):
            try:
                await asyncio.sleep(0)
                if i % 3 == 0:
                    raise ValueError(f"bad {i}")
                return {"i": i, "ok": True}
            except ValueError as exc:
                return {"i": i, "ok": False, "error": str(exc)}
        outcomes = await asyncio.gather(*(attempt(i) for i in range(6)))
        failed = [o["error"] for o in outcomes if not o["ok"]]
    """)
                },
            )
        }
    )
    results = await sb.run_workflow(workflow)
    assert results["safe"]["failed"] == ["bad 0", "bad 3"]
    assert [o["ok"] for o in results["safe"]["outcomes"]] == [False, True, True, False, True, True]


@in_module_loop
async def test_templated_parameters_used_as_variables_inside_nested_dicts(sb):
    workflow = build(
        {
            "connect": (
                ASYNC,
                {
                    "code": "url = f\"{config['db']['host']}:{config['db']['port']}\"\n"
                    "port_type = type(config['db']['port']).__name__\ntags = config['tags']",
                    "config": {"db": {"host": "${host}", "port": "${port}"}, "tags": ["env:${env}", "${env}"]},
                },
            )
        }
    )
    results = await sb.run_workflow(workflow, parameters={"connect": {"host": "db.local", "port": 5432, "env": "prod"}})
    assert results["connect"] == {"url": "db.local:5432", "port_type": "int", "tags": ["env:prod", "prod"]}
