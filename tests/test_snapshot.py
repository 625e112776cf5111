"""Snapshots: which outputs the host rebuilds as objects, which it keeps as
``Opaque`` bytes, and why nothing a worker returns can run code in, or take
down, the supervisor.

Unit tests feed ``sandbox.snapshot.decode_value`` hand-made pickles; the
others go through real workers.
"""

from __future__ import annotations

import datetime
import decimal
import fractions
import gc
import pickle
import struct
import textwrap
import time
import uuid
from pathlib import Path

import cloudpickle
import pytest

from sandbox import CodeError, Opaque, OutputLimitExceeded, PolicyViolation, Sandbox, WorkerCrashed
from sandbox.snapshot import Allowance, Budget, decode_value
from tests.conftest import HOSTILE, quick_policy

in_module_loop = pytest.mark.asyncio(loop_scope="module")

DEEP = 1_000_000
DEEP_ENOUGH_TO_CRASH_A_HASH = 500_000  # tuple.__hash__ recursion overflows the C stack well before this
FAST_S = 5.0  # a refused bomb is refused well within this, on a slow machine too
OPEN_POLICY = quick_policy(allowed_modules=["os", "posix", "sys", "asyncio"], denied_modules=[])


# --- hand-made pickles ------------------------------------------------------------


def _text(value: str) -> bytes:
    raw = value.encode()
    return pickle.BINUNICODE + struct.pack("<I", len(raw)) + raw


def _global(module: str, name: str) -> bytes:
    return _text(module) + _text(name) + pickle.STACK_GLOBAL


def _pickle(body: bytes) -> bytes:
    return pickle.PROTO + b"\x05" + body + pickle.STOP


def _memo(index: int) -> bytes:
    return pickle.LONG_BINGET + struct.pack("<I", index)


def _deep_tuple(depth: int = DEEP) -> bytes:
    return pickle.EMPTY_TUPLE + pickle.TUPLE1 * depth


def _doubling_chain(container: str, levels: int = 60) -> bytes:
    """x0 = (); x[i+1] = (x[i], x[i]): a few bytes per level, 2**levels when walked."""
    body = pickle.EMPTY_TUPLE + pickle.MEMOIZE
    for level in range(levels):
        pair = _memo(level) * 2
        body += (
            pair + pickle.TUPLE2 if container == "tuple" else pickle.EMPTY_LIST + pickle.MARK + pair + pickle.APPENDS
        ) + pickle.MEMOIZE
    return body


def _uuid_with_state(state_items: bytes) -> bytes:
    return (
        _global("uuid", "UUID")
        + pickle.EMPTY_TUPLE
        + pickle.NEWOBJ
        + pickle.EMPTY_DICT
        + pickle.MARK
        + state_items
        + pickle.SETITEMS
        + pickle.BUILD
    )


def _as_key(key: bytes) -> bytes:
    return pickle.EMPTY_DICT + key + pickle.NONE + pickle.SETITEM


def _many_calls(constructor: bytes, argument: str, calls: int) -> bytes:
    """``[constructor(argument)] * calls``, the argument stored once and fetched by memo."""
    call = _memo(0) + _memo(1) + pickle.TUPLE1 + pickle.REDUCE
    return _pickle(
        constructor
        + pickle.MEMOIZE
        + _text(argument)
        + pickle.MEMOIZE
        + pickle.EMPTY_LIST
        + pickle.MARK
        + call * calls
        + pickle.APPENDS
    )


def _huge_memo_index() -> bytes:
    index = struct.pack("<I", 0xFFFFFFF0)
    return _pickle(_text("kept") + pickle.LONG_BINPUT + index + pickle.POP + pickle.LONG_BINGET + index)


HUGE_MEMO_INDEX = _huge_memo_index()  # decodes to "kept"


_OP_BUDGET = "the reply needs more decoding work than the budget allows"
_STATE_BUILT = "only a new UUID restores state, and only its own fields"
_REPEATED = "constructor arguments repeat more data than the pickle holds"
_HASH_BOMB = _deep_tuple(DEEP_ENOUGH_TO_CRASH_A_HASH)

# name: (pickle, the reason it must be refused for)
BOMBS: dict[str, tuple[bytes, str]] = {
    "deep_lists": (_pickle(pickle.EMPTY_LIST * DEEP + pickle.APPEND * (DEEP - 1)), _OP_BUDGET),
    "deep_tuples": (_pickle(_deep_tuple()), "nested deeper than the budget"),
    "deep_tuple_key": (_pickle(_as_key(_HASH_BOMB)), "nested deeper than the budget"),
    "doubling_list_chain": (_pickle(_doubling_chain("list")), "expands to more objects than the budget"),
    "doubling_tuple_chain_key": (
        _pickle(_as_key(_doubling_chain("tuple"))),
        "keys expand to more objects than the budget",
    ),
    "uuid_with_deep_int_as_key": (_pickle(_as_key(_uuid_with_state(_text("int") + _HASH_BOMB))), _STATE_BUILT),
    "uuid_with_deep_safety_flag": (
        _pickle(_uuid_with_state(_text("int") + pickle.BININT1 + b"\x01" + _text("is_safe") + _HASH_BOMB)),
        _STATE_BUILT,
    ),
    "fraction_with_huge_exponent": (
        _pickle(_global("fractions", "Fraction") + _text("1e900000000") + pickle.TUPLE1 + pickle.REDUCE),
        "Fraction is rebuilt only from two integers",
    ),
    "fraction_of_huge_decimal": (
        _pickle(
            _global("fractions", "Fraction")
            + _global("decimal", "Decimal")
            + _text("1e900000000")
            + pickle.TUPLE1
            + pickle.REDUCE
            + pickle.TUPLE1
            + pickle.REDUCE
        ),
        "constructor arguments are not plain scalars",
    ),
    "one_string_fed_to_many_decimals": (_many_calls(_global("decimal", "Decimal"), "9" * 1_000_000, 20_000), _REPEATED),
    "one_string_fed_to_many_uuids": (  # UUID() strips the dashes, copying the string every time
        _many_calls(_global("uuid", "UUID"), "0" * 32 + "-" * 1_000_000, 20_000),
        _REPEATED,
    ),
    "hex_text_long_into_decimal": (
        _pickle(
            _global("decimal", "Decimal")
            + pickle.LONG
            + b"0x"
            + b"f" * 4_000_000
            + b"\n"
            + pickle.TUPLE1
            + pickle.REDUCE
        ),
        "the pickle uses an opcode that inert data never needs",
    ),
}


# Lets a bomb run into the guard it is aimed at instead of the shared op budget.
_UNLIMITED_OPS = Budget(max_ops=10**9)


def _decode_timed(data: bytes, budget: Budget | None = None) -> tuple[object, float]:
    start = time.perf_counter()
    value = decode_value(data, "label", budget or Budget())
    return value, time.perf_counter() - start


class RunsACommand:
    """Unpickling it runs ``touch canary``, the way a hostile output would."""

    def __init__(self, canary: str) -> None:
        self.canary = canary

    def __reduce__(self) -> tuple:
        import os

        return (os.system, (f"touch {self.canary}",))


# --- fixtures ------------------------------------------------------------------


@pytest.fixture
def canary(tmp_path: Path) -> Path:
    """A path in a host directory that only the host can write; no worker sees it."""
    directory = tmp_path / "host-only"
    directory.mkdir(mode=0o700)
    return directory / "canary"


# --- decode_value: what becomes an object ------------------------------------------

INERT_VALUES = [
    None,
    True,
    False,
    0,
    -(2**4000),
    1.5,
    float("inf"),
    2 - 3j,
    "text ü",
    b"\x00bytes",
    bytearray(b"ba"),
    [1, [2, [3]]],
    (1, ("two", None)),
    {"a": {1: [2.5]}},
    {1, "two"},
    frozenset({(1, 2), "x"}),
    datetime.datetime(2024, 2, 29, 23, 59, 58, 999, tzinfo=datetime.timezone(datetime.timedelta(hours=-3), "X")),
    datetime.date(1970, 1, 1),
    datetime.time(12, 30, tzinfo=datetime.UTC),
    datetime.timedelta(-1, 5, 7),
    datetime.UTC,
    decimal.Decimal("-1.50E+30"),
    fractions.Fraction(-3, 4),
    uuid.UUID("12345678-1234-5678-1234-567812345678"),
    uuid.UUID(int=5, is_safe=uuid.SafeUUID.unsafe),
    {(1, (2, 3)): frozenset({uuid.UUID(int=1)}), datetime.date(2020, 1, 1): [decimal.Decimal(1)]},
]


@pytest.mark.parametrize("value", INERT_VALUES, ids=lambda v: type(v).__name__)
def test_inert_builtin_data_is_rebuilt_as_equal_objects_of_the_same_type(value):
    decoded = decode_value(cloudpickle.dumps(value, protocol=5), type(value).__name__)
    assert type(decoded) is type(value)
    assert decoded == value
    if isinstance(value, uuid.UUID):
        assert decoded.is_safe is value.is_safe


def test_shared_references_keep_their_shape():
    shared = [1, 2]
    decoded = decode_value(cloudpickle.dumps({"a": shared, "b": (shared, shared)}, protocol=5), "dict")
    assert decoded == {"a": [1, 2], "b": ([1, 2], [1, 2])}
    assert decoded["a"] is decoded["b"][0] is decoded["b"][1]


def _opaque_samples() -> dict[str, object]:
    def function(v):
        return v

    cycle: list = []
    cycle.append(cycle)
    return {
        "instance": RunsACommand("/nonexistent"),
        "function": function,
        "range": range(3),
        "ellipsis": Ellipsis,
        "function_in_list": [1, function],
        "type": int,
        "cycle": cycle,
        "over_depth": _nested(120),
        "over_int": 1 << 40_000,
    }


def _nested(depth: int) -> list:
    value: list = []
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize("name", list(_opaque_samples()))
def test_anything_but_inert_data_within_budget_stays_opaque_bytes(name):
    blob = cloudpickle.dumps(_opaque_samples()[name], protocol=5)
    value = decode_value(blob, f"label-{name}")
    assert isinstance(value, Opaque)
    assert value.data == blob and value.size == len(blob)
    assert value.type_name == f"label-{name}" and value.reason


@pytest.mark.parametrize(
    "module, name",
    [
        ("posix", "system"),
        ("os", "system"),
        ("builtins", "exec"),
        ("builtins", "eval"),
        ("subprocess", "call"),
        ("builtins", "getattr"),
    ],
)
def test_a_pickle_naming_a_callable_outside_the_allowlist_never_calls_it(canary, module, name):
    data = _pickle(_global(module, name) + _text(f"open({str(canary)!r}, 'w')") + pickle.TUPLE1 + pickle.REDUCE)
    value = decode_value(data, "payload")
    assert isinstance(value, Opaque)
    assert value.reason == f"{module}.{name} is not an inert type"
    assert not canary.exists()


def test_a_malicious_reduce_is_kept_as_bytes_and_never_run_on_the_host(canary):
    value = decode_value(cloudpickle.dumps(RunsACommand(str(canary)), protocol=5), "RunsACommand")
    assert isinstance(value, Opaque) and value.reason == "posix.system is not an inert type"
    assert not canary.exists()


# --- decode_value: bombs --------------------------------------------------------------


@pytest.mark.parametrize("name", list(BOMBS))
def test_pickle_bombs_come_back_opaque_quickly_for_the_right_reason(name):
    data, reason = BOMBS[name]
    value, seconds = _decode_timed(data, Budget() if reason == _OP_BUDGET else _UNLIMITED_OPS)
    assert isinstance(value, Opaque)
    assert value.data == data and value.reason == reason
    assert seconds < FAST_S


def test_a_huge_memo_index_costs_nothing():
    value, seconds = _decode_timed(HUGE_MEMO_INDEX)
    assert value == "kept"
    assert seconds < 1.0


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x80\x05",
        b"garbage",
        _pickle(_memo(7)),
        _pickle(_deep_tuple(5))[:-1],
        cloudpickle.dumps([1, 2, 3], protocol=5)[:-3],
        pickle.dumps([1, 2], protocol=0),
    ],
    ids=["empty", "header_only", "garbage", "unknown_memo", "no_stop", "truncated", "protocol_0"],
)
def test_malformed_or_foreign_protocol_streams_are_opaque(data):
    value = decode_value(data, "label")
    assert isinstance(value, Opaque) and value.data == data


def test_many_keys_sharing_one_hash_are_refused():
    keys = [i * ((1 << 61) - 1) for i in range(1, 40)]  # every one hashes to 0
    assert len({hash(k) for k in keys}) == 1
    value = decode_value(cloudpickle.dumps(dict.fromkeys(keys), protocol=5), "dict")
    assert isinstance(value, Opaque) and value.reason == "too many keys share one hash"


def test_a_uuid_is_filled_in_once_and_only_with_its_own_fields():
    twice = _pickle(
        _uuid_with_state(_text("int") + pickle.BININT1 + b"\x01")
        + pickle.EMPTY_DICT
        + _text("int")
        + pickle.BININT1
        + b"\x02"
        + pickle.SETITEM
        + pickle.BUILD
    )
    extra_field = _pickle(_uuid_with_state(_text("int") + pickle.BININT1 + b"\x01" + _text("x") + pickle.NONE))
    out_of_range = _pickle(_uuid_with_state(_text("int") + pickle.LONG1 + b"\x11" + b"\x00" * 16 + b"\x01"))
    for data in (twice, extra_field, out_of_range):
        assert isinstance(decode_value(data, "UUID"), Opaque)


# --- Opaque on the host ----------------------------------------------------------------


def test_opaque_compares_and_hashes_by_identity_and_pickles_as_opaque():
    first, second = Opaque(b"same", "T", "r"), Opaque(b"same", "T", "r")
    assert first != second and first == first
    assert len({first, second}) == 2
    again = pickle.loads(pickle.dumps(first))
    assert type(again) is Opaque and again.data == b"same" and again.type_name == "T"


def test_opaque_repr_shows_type_and_size_and_escapes_the_label():
    value = Opaque(b"12345", "evil\x1b[2J\nFAKE <Opaque int (1 bytes)>\u202e", "r")
    text = repr(value)
    assert text.startswith("<Opaque evil") and text.endswith(" (5 bytes)>")
    assert text.isascii() and text.isprintable()


# --- real workers -----------------------------------------------------------------------


@in_module_loop
async def test_every_inert_type_made_in_a_worker_comes_back_as_an_object(shared_sandbox):
    code = textwrap.dedent("""
        import datetime, decimal, fractions, uuid
        values = [None, True, 7, 2 ** 100, 1.5, 2j, "s", b"b", bytearray(b"ba"), (1,), {1}, frozenset({2}),
                  datetime.datetime(2024, 1, 2, tzinfo=datetime.timezone.utc), datetime.date(2024, 1, 2),
                  datetime.time(3, 4), datetime.timedelta(seconds=5), decimal.Decimal("1.25"),
                  fractions.Fraction(1, 3), uuid.UUID(int=7)]
        mapping = {"nested": {"list": [1, [2]]}}
    """)
    r = await shared_sandbox.run(code)
    values = r.outputs["values"]
    assert [type(v).__name__ for v in values] == [
        "NoneType",
        "bool",
        "int",
        "int",
        "float",
        "complex",
        "str",
        "bytes",
        "bytearray",
        "tuple",
        "set",
        "frozenset",
        "datetime",
        "date",
        "time",
        "timedelta",
        "Decimal",
        "Fraction",
        "UUID",
    ]
    assert values[16] == decimal.Decimal("1.25") and values[17] == fractions.Fraction(1, 3)
    assert r.outputs["mapping"] == {"nested": {"list": [1, [2]]}}


@in_module_loop
async def test_each_variable_is_decoded_on_its_own(shared_sandbox):
    code = textwrap.dedent("""
        class Point:
            def __init__(self, x, y):
                self.x, self.y = x, y
        point = Point(3, 4)
        numbers = [1, 2, 3]
        mixed = [1, point]
        deep = []
        for _ in range(150):
            deep = [deep]
        huge = 1 << 40000
    """)
    r = await shared_sandbox.run(code)
    out = r.outputs
    assert out["numbers"] == [1, 2, 3]
    assert {name for name, value in out.items() if isinstance(value, Opaque)} == {"point", "mixed", "deep", "huge"}
    assert out["point"].type_name == "__main__.Point"
    assert repr(out["point"]) == f"<Opaque __main__.Point ({out['point'].size} bytes)>"
    assert out["mixed"].type_name == "list" and out["deep"].type_name == "list" and out["huge"].type_name == "int"
    assert out["deep"].reason == "nested deeper than the budget"


@in_module_loop
async def test_an_opaque_output_is_an_input_of_a_later_run_alone_or_nested(shared_sandbox):
    code = textwrap.dedent("""
        class Point:
            def __init__(self, x, y):
                self.x, self.y = x, y
            def norm(self):
                return (self.x ** 2 + self.y ** 2) ** 0.5
        point = Point(3, 4)
        other = Point(6, 8)
    """)
    first = (await shared_sandbox.run(code)).outputs
    assert isinstance(first["point"], Opaque)
    r = await shared_sandbox.run(
        "norm = p.norm()\nnorms = [q.norm() for q in ps]\nby_key = m['k'].norm()\nsame = ps[0] is not ps[1]",
        {"p": first["point"], "ps": [first["point"], first["other"]], "m": {"k": first["other"]}},
    )
    assert r.outputs == {"norm": 5.0, "norms": [5.0, 10.0], "by_key": 10.0, "same": True}


@in_module_loop
async def test_over_budget_values_load_normally_inside_a_later_run(shared_sandbox):
    code = textwrap.dedent("""
        deep = []
        for _ in range(150):
            deep = [deep]
        chain = []
        for _ in range(60):
            chain = [chain, chain]
        huge = 1 << 40000
    """)
    out = (await shared_sandbox.run(code)).outputs
    assert out["chain"].reason == "expands to more objects than the budget"
    count = textwrap.dedent("""
        depth = levels = 0
        while deep:
            deep, depth = deep[0], depth + 1
        while chain:
            chain, levels = chain[0], levels + 1
        bits = huge.bit_length()
    """)
    r = await shared_sandbox.run(count, {"deep": out["deep"], "chain": out["chain"], "huge": out["huge"]})
    assert {k: r.outputs[k] for k in ("depth", "levels", "bits")} == {"depth": 150, "levels": 60, "bits": 40001}


@in_module_loop
async def test_objects_whose_methods_would_act_stay_inert_on_the_host(shared_sandbox, canary):
    code = textwrap.dedent("""
        class Tripwire:
            def __init__(self, path):
                self.path = path
            def _act(self, *args):
                open(self.path, "w").close()
                return 1
            __del__ = __repr__ = __str__ = __format__ = __eq__ = __ne__ = __hash__ = __bool__ = _act
        wire = Tripwire(path)
        wires = [wire, Tripwire(path)]
    """)
    r = await shared_sandbox.run(code, {"path": str(canary)})
    wire, wires = r.outputs["wire"], r.outputs["wires"]
    assert isinstance(wire, Opaque) and isinstance(wires, Opaque)
    assert repr(wire).startswith("<Opaque __main__.Tripwire (") and f"{wires}".startswith("<Opaque list (")
    assert wire != wires and wire == wire and len({wire, wires}) == 2 and bool(wire)
    del wire, wires, r
    gc.collect()
    assert not canary.exists()


@in_module_loop
async def test_unsafe_unpickle_is_the_one_explicit_way_to_run_a_value_on_the_host(shared_sandbox, canary):
    code = textwrap.dedent("""
        class Tripwire:
            def __init__(self, path):
                self.path = path
            def __repr__(self):
                open(self.path, "w").close()
                return "tripped"
        wire = Tripwire(path)
    """)
    wire = (await shared_sandbox.run(code, {"path": str(canary)})).outputs["wire"]
    repr(wire)
    assert not canary.exists()
    assert repr(wire.unsafe_unpickle()) == "tripped"
    assert canary.exists()


@in_module_loop
async def test_a_malicious_reduce_in_an_output_does_not_run_on_the_host(canary):
    code = textwrap.dedent("""
        import os
        class Payload:
            def __reduce__(self):
                return (os.system, (f"touch {path}",))
        payload = Payload()
        inside = [1, {"k": Payload()}]
    """)
    async with Sandbox(OPEN_POLICY, workers=1) as sb:
        out = (await sb.run(code, {"path": str(canary)})).outputs
        assert isinstance(out["payload"], Opaque) and isinstance(out["inside"], Opaque)
        assert out["payload"].reason == "posix.system is not an inert type"
        assert repr(out["payload"]).startswith("<Opaque __main__.Payload (") and out["payload"] != out["inside"]
        # Handed back, it is rebuilt inside a worker, which cannot reach the host's directory.
        r = await sb.run("done = True", {"value": out["payload"], "nested": [out["inside"]]})
        assert r.outputs == {"done": True}
    del out
    gc.collect()
    assert not canary.exists()


@in_module_loop
async def test_a_rebuilt_opaque_input_is_still_under_the_import_policy(shared_sandbox, canary):
    payload = Opaque(cloudpickle.dumps(RunsACommand(str(canary)), protocol=5), "RunsACommand", "r")
    with pytest.raises(PolicyViolation) as info:
        await shared_sandbox.run("pass", {"nested": [payload]})
    assert info.value.module == "posix"
    assert not canary.exists()


@in_module_loop
async def test_a_value_exactly_at_the_size_cap_passes_and_one_byte_more_is_refused():
    size = 4000
    cap = len(cloudpickle.dumps(b"x" * size, protocol=5))
    assert len(cloudpickle.dumps(b"x" * (size + 1), protocol=5)) == cap + 1
    async with Sandbox(quick_policy(max_result_bytes=cap), workers=1) as sb:
        r = await sb.run("value = b'x' * n\nsmall = 1", {"n": size})
        assert r.outputs == {"value": b"x" * size, "small": 1}
        with pytest.raises(OutputLimitExceeded) as info:
            await sb.run("small = 1\nvalue = b'x' * n", {"n": size + 1})
        assert (await sb.run("after = 2")).outputs == {"after": 2}
    error = info.value
    assert error.variable == "value" and error.limit_bytes == cap
    assert f"variable 'value' is {cap + 1} bytes serialized" in str(error)


@in_module_loop
async def test_a_doubling_chain_from_a_worker_is_opaque_and_the_host_stays_up(shared_sandbox):
    code = textwrap.dedent("""
        chain = ()
        for _ in range(60):
            chain = (chain, chain)
    """)
    r = await shared_sandbox.run(code)
    assert r.outputs["chain"].reason == "expands to more objects than the budget"
    assert (await shared_sandbox.run("ok = 1")).outputs == {"ok": 1}


# --- hostile samples -------------------------------------------------------------------------


def _hostile(name: str) -> tuple[str, dict[str, str]]:
    path = HOSTILE / name
    if not path.exists():
        pytest.skip(f"{path} is not available")
    code = path.read_text()
    header = {}
    for line in code.splitlines():
        if not line.startswith("# "):
            break
        key, _, value = line[2:].partition(":")
        header[key.strip()] = value.strip()
    return code, header


def _check_expected(header: dict[str, str], outcome: object) -> None:
    allowed = {name.strip() for name in header["expect"].split(",")}
    assert ("ok" if not isinstance(outcome, BaseException) else type(outcome).__name__) in allowed


@in_module_loop
async def test_hostile_poisoned_result(canary):
    code, header = _hostile("poisoned_result.py")
    assert header["inputs"] == "canary"
    async with Sandbox(quick_policy(), workers=1) as sb:
        try:
            outcome: object = await sb.run(code, {"canary": str(canary)})
        except (CodeError, PolicyViolation, WorkerCrashed) as exc:
            outcome = exc
        _check_expected(header, outcome)
        if not isinstance(outcome, BaseException):
            value = outcome.outputs["value"]
            assert isinstance(value, Opaque) and value.reason == "posix.system is not an inert type"
            assert repr(value).startswith("<Opaque __main__.Payload (") and value == value
            del value, outcome
        gc.collect()
        assert (await sb.run("next_run = 1")).outputs == {"next_run": 1}
    assert not canary.exists()


@in_module_loop
async def test_hostile_deep_result(shared_sandbox):
    code, header = _hostile("deep_result.py")
    try:
        outcome: object = await shared_sandbox.run(code)
    except (OutputLimitExceeded, CodeError) as exc:
        outcome = exc
    _check_expected(header, outcome)
    if not isinstance(outcome, BaseException):
        deep = outcome.outputs.get("deep")
        assert deep is None or isinstance(deep, Opaque)
    assert (await shared_sandbox.run("next_run = 1")).outputs == {"next_run": 1}


def test_one_reply_shares_one_decoding_budget_across_its_outputs():
    # A million empty sets cost the host ~200 MB; splitting them over outputs must not multiply that.
    empty_sets = _pickle(pickle.EMPTY_LIST + pickle.MARK + pickle.EMPTY_SET * 200_000 + pickle.APPENDS)
    allowance = Allowance(Budget())
    decoded = [decode_value(empty_sets, f"part{i}", Budget(), allowance) for i in range(5)]
    assert isinstance(decoded[0], list) and len(decoded[0]) == 200_000
    assert all(isinstance(value, Opaque) for value in decoded[1:])
    assert decoded[-1].reason == _OP_BUDGET
