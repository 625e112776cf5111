"""numpy and pandas values as bytes whose readers cannot run code.

Owns: the tagged encoding of numpy arrays and scalars (numpy's ``.npy``
format, written and read with ``allow_pickle=False``) and of pandas
``DataFrame``, ``Series`` and ``Index`` (an Apache Arrow IPC stream), and
the rule for which of those values it covers. The worker encodes its
outputs with it and decodes its inputs; the host encodes its inputs with it,
and ``sandbox.values`` checks worker bytes before handing them to
:func:`decode`.

Must never: import numpy, pandas or pyarrow unless the value in hand is
already one of theirs (its module is loaded, because user code or the host
loaded it), so that a worker whose code never touched them never pays for
them; pickle anything; or decide that bytes a worker sent are safe. The
host's checks live in ``sandbox.values``; :func:`decode` trusts its bytes.

A tagged value is ``MAGIC``, one kind byte, then the payload. A pickle
stream starts with the PROTO opcode (0x80), so the two never collide. What
this module does not cover (object arrays, ndarray subclasses, frames with
arbitrary objects in a column, MultiIndex) gets ``None`` from
:func:`encode` and travels as cloudpickle, as any other value.

Why the dtype rule is strict: a pandas value is encoded only if it comes
back equal, with its dtypes, index and names. Arrow stores strings as
strings, so an object column holding only ``str`` is sent as Arrow strings
and turned back into an object column by :func:`decode`; anything looser
(mixed objects, Period, Interval, Sparse, pyarrow-backed dtypes) stays a
pickle and an ``Opaque`` on the host.

Why pyarrow need not be in a tenant's allowlist: this module imports it
with the interpreter's own ``__import__`` (the guard checks only imports
made from user code), and only to encode a pandas value the code already
built or to decode one the host sent, so pandas' allowance is what decides.
That leaves pyarrow loaded for the worker's later runs, which pandas does
anyway when it is installed; the import guard is not the wall, confinement
is (see ``runtime.guards``).
"""

from __future__ import annotations

import io
import json
import sys
from typing import Any

MAGIC = b"\xa5SBV"
NDARRAY = 0x61  # "a"
NUMPY_SCALAR = 0x73  # "s"
DATAFRAME = 0x66  # "f"
SERIES = 0x53  # "S"
UNNAMED_SERIES = 0x75  # "u"
INDEX = 0x69  # "i"
NUMPY_KINDS = frozenset({NDARRAY, NUMPY_SCALAR})
PANDAS_KINDS = frozenset({DATAFRAME, SERIES, UNNAMED_SERIES, INDEX})
HEADER_BYTES = len(MAGIC) + 1
# Schema metadata key for what Arrow does not keep: which columns (and whether the index) held
# Python strings in an object column, and the frequency of a DatetimeIndex or TimedeltaIndex.
RESTORE = b"sandbox.restore"
_PLAIN_DTYPE_KINDS = frozenset("biufmM")  # bool, ints, floats, timedelta64, datetime64
# pandas' own extension dtypes that Arrow holds exactly (the nullable ones, strings, datetimes with a zone).
_EXTENSION_DTYPES = frozenset(
    {"DatetimeTZDtype", "StringDtype", "BooleanDtype", "Float32Dtype", "Float64Dtype"}
    | {f"{sign}Int{bits}Dtype" for sign in ("", "U") for bits in (8, 16, 32, 64)}
)


def kind_of(data: bytes) -> int | None:
    """The kind byte of a tagged value, or None for anything else (a pickle)."""
    if len(data) >= HEADER_BYTES and data.startswith(MAGIC):
        return data[len(MAGIC)]
    return None


def encode(value: object) -> bytes | None:
    """The tagged bytes of a numpy or pandas value this module covers, else None."""
    module = type(value).__module__
    if module == "numpy" or module.startswith("numpy."):
        return _encode_numpy(value, sys.modules.get("numpy"))
    if module == "pandas" or module.startswith("pandas."):
        return _encode_pandas(value, sys.modules.get("pandas"))
    return None


def _encode_numpy(value: Any, np: Any) -> bytes | None:
    if np is None:
        return None
    if type(value) is np.ndarray:
        kind, array = NDARRAY, value
    elif isinstance(value, np.generic):
        kind, array = NUMPY_SCALAR, np.asarray(value)
    else:
        return None
    if array.dtype.hasobject:
        return None
    buffer = io.BytesIO()
    buffer.write(MAGIC + bytes([kind]))
    np.lib.format.write_array(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def _encode_pandas(value: Any, pd: Any) -> bytes | None:
    if pd is None or not pandas_supported(pd):
        return None
    if type(value) is pd.DataFrame:
        kind, frame = DATAFRAME, value
    elif type(value) is pd.Series:
        kind, frame = (UNNAMED_SERIES if value.name is None else SERIES), value.to_frame()
    elif isinstance(value, pd.Index) and type(value).__module__.startswith("pandas"):
        kind, frame = INDEX, pd.DataFrame({"": False}, index=value)  # a column keeps the row count
    else:
        return None
    if not frame_fits(frame, pd):
        return None
    try:
        import pyarrow as pa
    except ImportError:
        return None
    index = frame.index
    restore = {
        "object_columns": [str(name) for name, column in frame.items() if pd.api.types.is_object_dtype(column.dtype)],
        "object_index": pd.api.types.is_object_dtype(index.dtype),
        "index_freq": index.freqstr if isinstance(index, (pd.DatetimeIndex, pd.TimedeltaIndex)) else None,
    }
    try:
        table = pa.Table.from_pandas(frame)  # a RangeIndex is kept as metadata
        metadata = {**(table.schema.metadata or {}), RESTORE: json.dumps(restore).encode()}
        table = table.replace_schema_metadata(metadata)
        sink = io.BytesIO()  # its getvalue() hands over the buffer; an Arrow buffer's to_pybytes() copies it
        sink.write(MAGIC + bytes([kind]))
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
    except (pa.ArrowException, ValueError, TypeError):
        return None  # a dtype Arrow cannot hold after all: it travels as a pickle
    return sink.getvalue()


def pandas_supported(pd: Any) -> bool:
    """pandas 3 or later: pandas 2 rebuilds some dtypes from Arrow differently (``string[pyarrow]``
    comes back ``string[python]``, a fixed UTC offset as a pytz zone), so its values stay pickles."""
    return int(pd.__version__.split(".")[0]) >= 3


def frame_fits(frame: Any, pd: Any) -> bool:
    """True if every column and the index hold data that survives Arrow unchanged."""
    columns, index = frame.columns, frame.index
    if isinstance(columns, pd.MultiIndex) or isinstance(index, pd.MultiIndex) or not columns.is_unique or frame.attrs:
        return False
    if not all(type(name) is str for name in columns) and not all(type(name) is int for name in columns):
        return False
    if not all(name is None or type(name) is str for name in (columns.name, index.name)):
        return False  # Arrow keeps these names as strings
    if not isinstance(index, pd.RangeIndex) and not _index_dtype_fits(index, pd):
        return False
    return all(_dtype_fits(column, pd) for _, column in frame.items())


def _index_dtype_fits(index: Any, pd: Any) -> bool:
    """An index keeps fewer dtypes than a column: pandas rebuilds it from its Arrow type alone."""
    dtype = index.dtype
    if isinstance(dtype, pd.StringDtype):
        return getattr(dtype, "na_value", pd.NA) is not pd.NA  # the default ``str``, not ``string``
    if isinstance(dtype, pd.api.extensions.ExtensionDtype):
        return isinstance(dtype, (pd.CategoricalDtype, pd.DatetimeTZDtype)) and _dtype_fits(index, pd)
    return _dtype_fits(index, pd)


def _dtype_fits(values: Any, pd: Any) -> bool:
    dtype = values.dtype
    if isinstance(dtype, pd.CategoricalDtype):
        return _dtype_fits(dtype.categories, pd)
    if isinstance(dtype, pd.ArrowDtype):
        return False
    if isinstance(dtype, pd.api.extensions.ExtensionDtype):
        return type(dtype).__name__ in _EXTENSION_DTYPES and type(dtype) is getattr(pd, type(dtype).__name__)
    if pd.api.types.is_object_dtype(dtype):
        return pd.api.types.infer_dtype(values, skipna=False) == "string"
    return dtype.kind in _PLAIN_DTYPE_KINDS


def decode(data: bytes) -> object:
    """Rebuild a tagged value. The bytes must come from a trusted side, or have passed ``sandbox.values``."""
    kind = kind_of(data)
    if kind in NUMPY_KINDS:
        import numpy as np

        array = np.lib.format.read_array(io.BytesIO(memoryview(data)[HEADER_BYTES:]), allow_pickle=False)
        return array[()] if kind == NUMPY_SCALAR else array
    if kind in PANDAS_KINDS:
        import pyarrow as pa

        return to_pandas(kind, pa.ipc.open_stream(pa.py_buffer(data)[HEADER_BYTES:]).read_all())
    raise ValueError("not a tagged numpy or pandas value")


def to_pandas(kind: int, table: Any) -> object:
    """The pandas value a decoded Arrow table stands for, with its object columns of strings restored."""
    frame = table.to_pandas()
    restore = json.loads((table.schema.metadata or {}).get(RESTORE, b"{}"))
    for name in restore.get("object_columns", ()):
        label = next(label for label in frame.columns if str(label) == name)
        frame[label] = frame[label].astype(object)
    if restore.get("object_index"):
        frame.index = frame.index.astype(object)
    if restore.get("index_freq"):
        # The constructor checks that the index conforms to the frequency, and raises if not.
        frame.index = type(frame.index)(frame.index, freq=restore["index_freq"])
    if kind == DATAFRAME:
        return frame
    if kind == INDEX:
        return frame.index
    series = frame.iloc[:, 0]
    return series.rename(None) if kind == UNNAMED_SERIES else series
