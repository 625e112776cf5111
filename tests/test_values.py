"""numpy and pandas values: real objects on the host without pickle, ``.npy``
and Arrow bytes that a hostile worker forges, the decoded-size budget, inputs,
and a host without the libraries.

Values are built by the same code in a real worker and in the test process,
and compared. Forged bytes are written on the channel (fd 3) by the run
itself, as a worker taken over by its own run would.
"""

from __future__ import annotations

import asyncio
import gc
import io
import json
import random
import sys
import textwrap
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import pytest_asyncio

from sandbox import Opaque, PolicyViolation, Sandbox, values as host_values
from sandbox.inputs import encode_inputs
from sandbox.runtime import values as tagged
from sandbox.snapshot import Allowance, Budget, decode_value
from tests.conftest import quick_policy
from tests.test_protocol import FORGER, LATE_REPLY_S
from tests.test_snapshot import RunsACommand

in_module_loop = pytest.mark.asyncio(loop_scope="module")

MiB = 1024 * 1024
DATA_POLICY = quick_policy(
    allowed_modules=["numpy.*", "pandas.*", "os", "sys", "asyncio"], denied_modules=[], max_result_bytes=4 * MiB
)
FAST_S = 5.0  # a refused forgery is refused well within this, on a loaded machine too

NUMPY_VALUES = textwrap.dedent("""
    import numpy as np
    ints = np.arange(12, dtype=np.int32).reshape(3, 4)
    fortran = np.asfortranarray(np.linspace(0.0, 1.0, 6).reshape(2, 3))
    flags = np.array([True, False, True])
    structured = np.array([(1, 2.5, b"ab"), (3, -1.0, b"c")], dtype=[("id", "<i8"), ("x", "<f4"), ("tag", "S2")])
    days = np.array(["2024-01-01", "2024-02-29", "NaT"], dtype="datetime64[D]")
    stamps = np.array(["2024-01-01T12:00:00.123456789"], dtype="datetime64[ns]")
    gaps = np.array([1, 2], dtype="timedelta64[s]")
    words = np.array(["héllo", ""], dtype="U5")
    empty = np.zeros((0, 3), dtype=np.uint16)
    half = np.float64(0.5)
    small = np.int8(-3)
    flag = np.bool_(True)
    moment = np.datetime64("2024-03-01T10:00")
    text = np.str_("naïve")
    record = structured[0]
""")

PANDAS_VALUES = textwrap.dedent("""
    import numpy as np
    import pandas as pd
    mixed = pd.DataFrame(
        {"i": [1, 2, 3], "f": [1.5, None, 3.0], "b": [True, False, True], "s": ["x", "y", None],
         "u8": np.array([1, 2, 3], dtype=np.uint8), "f32": np.array([1, 2, 3], dtype=np.float32)}
    )
    numbered_columns = pd.DataFrame({0: [1, 2], 1: [3, 4]})
    zoned = pd.DataFrame(
        {"t": pd.date_range("2024-01-01", periods=3, tz="Europe/Paris")}, index=pd.Index([5, 6, 7], name="k")
    )
    categories = pd.DataFrame(
        {"c": pd.Categorical(["a", "b", "a"], ordered=True), "n": pd.Categorical([1, 2, 1])},
        index=pd.DatetimeIndex(["2024-01-01", "2024-01-03", "2024-01-02"], name="when"),
    )
    by_label = pd.DataFrame({"v": [1, 2]}, index=pd.Index(["a", "b"], name="label")).rename_axis(columns="cols")
    object_strings = pd.DataFrame({"o": pd.array(["a", "b"], dtype=object)}, index=pd.Index(["p", "q"], dtype=object))
    nullable = pd.DataFrame(
        {"I": pd.array([1, None], dtype="Int64"), "B": pd.array([True, None], dtype="boolean"),
         "F": pd.array([1.5, None], dtype="Float32"), "S": pd.array(["z", None], dtype="string")}
    )
    ranged = pd.DataFrame({"v": [1, 2]}, index=pd.RangeIndex(10, 14, 2, name="r"))
    daily = pd.DataFrame({"v": [1.0, 2.0, 3.0]}, index=pd.date_range("2024-01-01", periods=3, freq="D", name="day"))
    weekly = pd.Series([1, 2], index=pd.date_range("2024-01-07", periods=2, freq="W-SUN", tz="UTC"))
    hours = pd.timedelta_range("1h", periods=3, freq="15min")
    durations = pd.DataFrame({"d": pd.to_timedelta([1, 2], unit="s")})
    nothing = pd.DataFrame()
    named = pd.Series([1, 2], name="x", index=pd.Index(["a", "b"]))
    unnamed = pd.Series([1.0, 2.0])
    numbered = pd.Series(["a", "b"], name=3)
    categorical_series = pd.Series(pd.Categorical(["lo", "hi"]), name="level")
    numbers = pd.Index([1, 2], name="a")
    span = pd.RangeIndex(5)
    dates = pd.DatetimeIndex(["2024-01-01"], name="d")
    labels = pd.Index(["a", "b"])
    object_labels = pd.Index(["a"], dtype=object)
    levels = pd.CategoricalIndex(["a", "b", "a"])
""")


def _built(code: str) -> dict[str, object]:
    namespace: dict[str, object] = {}
    exec(code, namespace)
    return {name: value for name, value in namespace.items() if not name.startswith("_") and name not in ("np", "pd")}


def assert_same(expected: object, got: object) -> None:
    """Equal, with the same type and dtypes, index and names."""
    assert type(got) is type(expected), (type(got), type(expected))
    if isinstance(expected, pd.DataFrame):
        pd.testing.assert_frame_equal(got, expected)
    elif isinstance(expected, pd.Series):
        pd.testing.assert_series_equal(got, expected)
    elif isinstance(expected, pd.Index):
        pd.testing.assert_index_equal(got, expected, exact=True)
    else:
        assert got.dtype == expected.dtype  # type: ignore[attr-defined]
        np.testing.assert_array_equal(got, expected)
        if isinstance(expected, np.ndarray):
            assert got.flags.f_contiguous == expected.flags.f_contiguous  # type: ignore[attr-defined]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def data_sandbox():
    async with Sandbox(DATA_POLICY, workers=2) as sb:
        yield sb


# --- what comes back real ---------------------------------------------------------------


@in_module_loop
@pytest.mark.parametrize("code", [NUMPY_VALUES, PANDAS_VALUES], ids=["numpy", "pandas"])
async def test_numpy_and_pandas_outputs_come_back_as_the_real_objects(data_sandbox, code):
    expected = _built(code)
    r = await data_sandbox.run(code)
    assert set(r.outputs) == set(expected)
    for name, value in expected.items():
        assert not isinstance(r.outputs[name], Opaque), (name, r.outputs[name].reason)
        assert_same(value, r.outputs[name])


@in_module_loop
@pytest.mark.parametrize("code", [NUMPY_VALUES, PANDAS_VALUES], ids=["numpy", "pandas"])
async def test_the_same_values_travel_as_inputs_without_pickle_and_come_back_equal(data_sandbox, code):
    inputs = _built(code)
    encoded = encode_inputs(inputs)
    assert all(tagged.kind_of(blob) is not None for blob in encoded.values())
    echo = "\n".join(f"out_{name} = {name}" for name in inputs)
    probe = "kinds = {name: type(value).__module__ for name, value in dict(globals()).items() if name in wanted}"
    r = await data_sandbox.run(f"{echo}\n{probe}", {**inputs, "wanted": sorted(inputs)})
    assert set(r.outputs.pop("kinds").values()) <= {"numpy", "pandas"}
    for name, value in inputs.items():
        assert_same(value, r.outputs[f"out_{name}"])


@in_module_loop
async def test_an_opaque_holding_npy_bytes_inside_an_input_is_rebuilt_in_the_worker(data_sandbox):
    boxed = Opaque(tagged.encode(np.arange(4)), "numpy.ndarray", "kept as bytes")
    r = await data_sandbox.run("total = int(items[0].sum())\nkind = type(items[0]).__name__", {"items": [boxed]})
    assert r.outputs == {"total": 6, "kind": "ndarray"}


@in_module_loop
async def test_a_numpy_input_needs_numpy_allowed_but_a_pandas_one_never_needs_pyarrow():
    async with Sandbox(quick_policy(allowed_modules=["pandas"]), workers=1) as sb:
        r = await sb.run("rows = len(frame)", {"frame": pd.DataFrame({"a": [1, 2, 3]})})
        assert r.outputs == {"rows": 3}
        with pytest.raises(PolicyViolation) as info:
            await sb.run("n = 1", {"array": np.arange(3)})
    assert info.value.module == "numpy"


@in_module_loop
async def test_a_worker_whose_code_never_touched_them_never_loads_numpy_pandas_or_pyarrow():
    async with Sandbox(quick_policy(allowed_modules=["sys"], denied_modules=[]), workers=1) as sb:
        code = "import sys\nrows = [{'a': 1.5}]\nloaded = sorted(set(sys.modules) & {'numpy', 'pandas', 'pyarrow'})"
        r = await sb.run(code)
    assert r.outputs == {"rows": [{"a": 1.5}], "loaded": []}


# --- what stays Opaque ------------------------------------------------------------------


@in_module_loop
async def test_objects_inside_arrays_and_frames_stay_opaque_and_their_reduce_never_runs_on_the_host(
    data_sandbox, tmp_path: Path
):
    canary = tmp_path / "host-only" / "canary"
    canary.parent.mkdir(mode=0o700)
    code = textwrap.dedent(f"""
        import numpy as np, pandas as pd

        class Payload:
            def __reduce__(self):
                import os
                return (os.system, ("touch {canary}",))

        objects = np.empty(2, dtype=object)
        objects[0] = Payload()
        fields = np.array([(Payload(),)], dtype=[("o", object)])
        frame = pd.DataFrame({{"o": [Payload(), 1]}})
        series = pd.Series([Payload()], name="o")
        multi = pd.DataFrame({{"v": [1]}}, index=pd.MultiIndex.from_tuples([(1, 2)]))
        periods = pd.Series(pd.period_range("2024", periods=2, freq="M"))
        int_named_index = pd.DataFrame({{"a": [1]}}, index=pd.Index([3], name=0))  # Arrow would make it "0"
        nullable_index = pd.Series([1.0], index=pd.Index([1], dtype="Int64"))  # Arrow would make it int64
    """)
    r = await data_sandbox.run(code)
    for name in ("objects", "fields", "frame", "series", "multi", "periods", "int_named_index", "nullable_index"):
        value = r.outputs[name]
        assert isinstance(value, Opaque), name
        assert tagged.kind_of(value.data) is None  # travelled as a pickle, decoded by the restricted unpickler
        assert value.reason.endswith("is not an inert type")
    del r, value
    gc.collect()
    assert not canary.exists()


@in_module_loop
async def test_an_opaque_object_array_travels_back_unchanged_and_loads_in_the_worker():
    # Its pickle names numpy's internals, so the tenant must allow them, as for any pickled input.
    async with Sandbox(quick_policy(allowed_modules=["numpy.*"]), workers=1) as sb:
        r = await sb.run("import numpy as np\nboxes = np.array([{'a': 1}, [2]], dtype=object)")
        boxes = r.outputs["boxes"]
        assert isinstance(boxes, Opaque) and boxes.type_name == "numpy.ndarray"
        again = await sb.run("kinds = [type(x).__name__ for x in boxes]\nsame = boxes", {"boxes": boxes})
    assert again.outputs["kinds"] == ["dict", "list"]
    assert again.outputs["same"].data == boxes.data


# --- forged bytes -----------------------------------------------------------------------


def _tagged(kind: int, payload: bytes) -> bytes:
    return tagged.MAGIC + bytes([kind]) + payload


def _npy_header(descr: str, shape: tuple[int, ...]) -> bytes:
    header = repr({"descr": descr, "fortran_order": False, "shape": shape}).encode()
    header += b" " * (-(len(header) + 11) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header


def _object_npy(canary: Path) -> bytes:
    array = np.empty(1, dtype=object)
    array[0] = RunsACommand(str(canary))
    stream = io.BytesIO()
    np.lib.format.write_array(stream, array, allow_pickle=True)
    return _tagged(tagged.NDARRAY, stream.getvalue())


def _arrow(table: pa.Table, **options: object) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema, options=pa.ipc.IpcWriteOptions(**options)) as writer:
        writer.write_table(table)
    return _tagged(tagged.DATAFRAME, sink.getvalue().to_pybytes())


def _with_metadata(table: pa.Table, **entries: object) -> pa.Table:
    metadata = dict(table.schema.metadata or {})
    metadata.update({key.encode(): json.dumps(value).encode() for key, value in entries.items()})
    return table.replace_schema_metadata(metadata)


def _claims_more_rows(payload: bytes, rows: int, claimed: int) -> bytes:
    """The stream with its record batch's length field rewritten, as a forger would."""
    old, new = rows.to_bytes(8, "little"), claimed.to_bytes(8, "little")
    assert payload.count(old) >= 1
    return payload.replace(old, new)


ZEROS = pa.table({"z": pa.array(np.zeros(2_000_000, dtype=np.int64))})
BOOLS = pa.table({"b": pa.array(np.zeros(12 * MiB, dtype=bool))})  # 1.5 MiB of bits, 12 MiB as numpy


def _with_attrs() -> pa.Table:
    frame = pd.DataFrame({"a": [1]})
    frame.attrs = {"deep": [[[[]]]]}
    return pa.Table.from_pandas(frame)


def _forgeries(canary: Path) -> dict[str, tuple[bytes, str]]:
    """name: (bytes, the reason the host gives for keeping them Opaque)."""
    small = pa.Table.from_pandas(pd.DataFrame({"a": [1, 2, 3]}))
    return {
        "object_array": (_object_npy(canary), "an array of Python objects is a pickle"),
        "huge_shape": (
            _tagged(tagged.NDARRAY, _npy_header("<f8", (1 << 40,)) + b"\0" * 8),
            f"the npy header declares {8 << 40} bytes of data, the value holds 8",
        ),
        "zero_width_items": (
            _tagged(tagged.NDARRAY, _npy_header("|V0", (1 << 50,))),
            "decodes to more bytes than the reply's budget",
        ),
        "npy_garbage": (_tagged(tagged.NDARRAY, b"\x93NUMPY\x01\x00\xff\xff{"), "not decodable: ValueError"),
        "scalar_with_a_shape": (
            _tagged(tagged.NUMPY_SCALAR, _npy_header("<i8", (1,)) + b"\0" * 8),
            "a numpy scalar must be a 0-d array",
        ),
        "unknown_tag": (_tagged(0x7A, b"whatever"), "unknown value tag"),
        "compressed": (_arrow(ZEROS, compression="zstd"), "a compressed Arrow batch"),
        "rows_beyond_buffers": (_claims_more_rows(_arrow(small), 3, 1 << 40), "not decodable: ArrowInvalid"),
        "null_column": (
            _arrow(pa.table({"n": pa.nulls(1 << 30)})),
            "column 'n' has Arrow type null, which is not read",
        ),
        "string_views": (_arrow(pa.table({"v": pa.array(["x" * 20] * 4, pa.string_view())})), "string_view"),
        "extension_type": (
            _arrow(pa.Table.from_pandas(pd.DataFrame({"p": pd.period_range("2024", periods=2, freq="D")}))),
            "which is not read",
        ),
        "time_zone_path": (
            _arrow(pa.table({"t": pa.array([0], pa.timestamp("us", tz="dateutil//etc/shadow"))})),
            "which is not read",
        ),
        "bools_that_expand": (_arrow(BOOLS), "decodes to more bytes than the reply's budget"),
        "object_column_of_ints": (
            _arrow(_with_metadata(small, **{"sandbox.restore": {"object_columns": ["a"]}})),
            "an object column that is not a column of strings",
        ),
        "frequency_that_does_not_fit": (
            _arrow(
                _with_metadata(
                    pa.Table.from_pandas(
                        pd.DataFrame({"v": [1, 2]}, index=pd.DatetimeIndex(["2024-01-01", "2024-01-05"]))
                    ),
                    **{"sandbox.restore": {"index_freq": "D"}},
                )
            ),
            "not decodable: ValueError",
        ),
        "attrs": (_arrow(_with_attrs()), "builds a pandas value outside the types that are read"),
        "arrow_garbage": (_tagged(tagged.DATAFRAME, b"\xff\xff\xff\xff" + b"\x10" * 40), "not decodable: ArrowInvalid"),
    }


@pytest.mark.parametrize("compression", [None, "lz4", "zstd"])
def test_compression_is_found_in_dictionary_and_record_batches_before_pyarrow_reads_them(compression):
    table = pa.table({"c": pa.array(["a", "b", "a"]).dictionary_encode(), "n": [1, 2, 3]})
    stream = _arrow(table, compression=compression)[tagged.HEADER_BYTES :]
    messages = pa.ipc.MessageReader.open_stream(pa.py_buffer(stream))
    found = {}
    for message in iter(messages.read_next_message, None):
        if message.type != "schema":
            found[message.type] = host_values._names_compression(message.metadata.to_pybytes())
        if message.type == "record batch":
            break
    assert found == {"dictionary": compression is not None, "record batch": compression is not None}


def test_mutated_npy_and_arrow_bytes_decode_to_an_allowed_value_or_to_opaque_never_to_an_error():
    seeds = [
        tagged.encode(value)
        for value in (
            pd.DataFrame(
                {"i": [1, 2, 3], "s": ["a", "bb", None], "c": pd.Categorical(["x", "y", "x"])},
                index=pd.Index(["p", "q", "r"], name="n"),
            ),
            pd.Series([1.5, None], name="x"),
            np.array([(1, 2.0)], dtype=[("a", "i4"), ("b", "f8")]),
            pd.RangeIndex(4),
        )
    ]
    rng = random.Random(13)
    budget = Budget()
    outcomes = set()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # numpy warns about headers that look written by Python 2
        for _ in range(3000):
            data = bytearray(rng.choice(seeds))
            for _ in range(rng.randint(1, 3)):
                data[rng.randrange(tagged.HEADER_BYTES, len(data))] = rng.randrange(256)
            value = decode_value(bytes(data), "mutated", budget, Allowance(budget))
            outcomes.add(type(value))
    assert Opaque in outcomes
    assert outcomes <= {Opaque, pd.DataFrame, pd.Series, pd.RangeIndex, pd.Index, np.ndarray}


@in_module_loop
async def test_forged_npy_and_arrow_bytes_stay_opaque_quickly_and_never_run_code(tmp_path: Path):
    canary = tmp_path / "host-only" / "canary"
    canary.parent.mkdir(mode=0o700)
    forged = _forgeries(canary)
    # A small reply budget, so that bools worth 12 MiB once built are over it.
    policy = DATA_POLICY.model_copy(update={"max_reply_bytes": 8 * MiB, "max_result_bytes": 4 * MiB})
    async with Sandbox(policy, workers=1) as sb:
        blobs = {name: blob for name, (blob, _) in forged.items()}
        started = time.monotonic()
        r = await sb.run(
            FORGER + "os.write(3, _reply([(n, 'forged', b) for n, b in blobs.items()]))\nx = 1", {"blobs": blobs}
        )
        assert time.monotonic() - started < FAST_S
        assert set(r.outputs) == set(forged)
        for name, (blob, reason) in forged.items():
            value = r.outputs[name]
            assert isinstance(value, Opaque), name
            assert value.data == blob and reason in value.reason, (name, value.reason)
        del r, value
        gc.collect()
        await asyncio.sleep(LATE_REPLY_S)  # the run's genuine reply gets its worker killed
        assert (await sb.run("import numpy as np\na = np.ones(2)")).outputs["a"].tolist() == [1.0, 1.0]
    assert not canary.exists()


@in_module_loop
async def test_a_reply_shares_one_decoded_size_budget_across_its_outputs():
    # Bools travel as bits and decode to bytes: 3 Mi rows are 384 KiB on the wire and 3 MiB built.
    policy = DATA_POLICY.model_copy(update={"max_reply_bytes": 4 * MiB})
    code = "import numpy as np, pandas as pd\nfirst = pd.DataFrame({'b': np.zeros(3 * 2**20, bool)})\nsecond = first"
    async with Sandbox(policy, workers=1) as sb:
        r = await sb.run(code)
    assert type(r.outputs["first"]) is pd.DataFrame and len(r.outputs["first"]) == 3 * MiB
    assert isinstance(r.outputs["second"], Opaque)
    assert r.outputs["second"].reason == "decodes to more bytes than the reply's budget of 4194304"


def test_unsafe_unpickle_of_tagged_bytes_reads_them_without_pickle():
    frame = pd.DataFrame({"a": [1, 2]}, index=pd.Index(["x", "y"], name="k"))
    assert_same(frame, Opaque(tagged.encode(frame), "pandas.DataFrame", "kept").unsafe_unpickle())
    assert_same(np.float32(2.5), Opaque(tagged.encode(np.float32(2.5)), "numpy.float32", "kept").unsafe_unpickle())


# --- a host without the libraries ---------------------------------------------------


@in_module_loop
async def test_without_numpy_and_pandas_on_the_host_they_stay_opaque_and_travel_back(monkeypatch):
    for name in ("numpy", "pandas", "pyarrow"):
        monkeypatch.setitem(sys.modules, name, None)  # the host's imports of them now fail; the workers' do not
    async with Sandbox(DATA_POLICY, workers=1) as sb:
        r = await sb.run("import numpy as np, pandas as pd\narray = np.arange(3)\nframe = pd.DataFrame({'a': [1]})")
        array, frame = r.outputs["array"], r.outputs["frame"]
        assert isinstance(array, Opaque) and array.reason == "numpy is not installed on the host"
        assert isinstance(frame, Opaque) and frame.reason == "pandas is not installed on the host"
        again = await sb.run("total = int(array.sum()) + int(frame['a'].sum())", {"array": array, "frame": frame})
    assert again.outputs == {"total": 4}
