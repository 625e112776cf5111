"""Check a worker's numpy and pandas bytes before anything is built from them.

Owns: the host's side of ``sandbox.runtime.values``: which tagged bytes a
worker sent may become a real numpy or pandas object, and what that costs
against the reply's decoding allowance.

Must never: unpickle; read a ``.npy`` payload with ``allow_pickle=True``;
allocate for a size the worker declared before that size is checked against
the bytes actually present and against the allowance; or import numpy,
pandas or pyarrow before a tenant's policy allows numpy or pandas or a
reply carries one of their values (a host without them keeps such values
as ``Opaque``, as any other foreign object). When a policy allows them,
they are imported as the Sandbox starts (:func:`preload`), not at the first
value: importing a C extension holds the GIL for a quarter of a second,
which would stall the supervisor's event loop in the middle of other
tenants' runs. A tenant that reaches numpy only through another library it
may import (scipy, say) pays that once, at its first value, in the
decoding thread.

Why these checks, in this order. numpy's ``read_array`` allocates the whole
array from its header before reading the data, so the header's shape times
itemsize must equal the bytes that follow before it is called. Arrow reads
an uncompressed in-memory stream without copying, so its buffers cost
nothing until pandas converts them; but a compressed buffer is decompressed
into an allocation of the size it claims, so every batch is refused if its
metadata names a compression, which is found by reading the one field of
the message's flatbuffer that says so, before pyarrow reads the batch. The
schema must use only plain column types (no nested, view, extension or null
types: a null column of a billion rows holds no bytes at all), the table is
fully validated (offsets, UTF-8, dictionary indices), and what pandas will
allocate for it is estimated from the row count and types and spent from
the allowance before ``to_pandas`` runs. Finally the object built must be
what the worker is allowed to send (the same dtype rule the worker encodes
by), so metadata that asks pandas for other dtypes comes back ``Opaque``.
"""

from __future__ import annotations

import importlib
import io
import json
import math
import re
import struct
from collections.abc import Iterable
from types import ModuleType
from typing import TYPE_CHECKING, Any

from sandbox.runtime import values as tagged

if TYPE_CHECKING:
    from sandbox.snapshot import Allowance

# What one string costs pandas beyond its bytes when it becomes a Python object.
_PYTHON_STRING_BYTES = 64
_MAX_FREQUENCY_CHARS = 32  # "W-SUN", "15min", "QE-DEC": frequencies are short
_FREQUENCY_CHECK_BYTES_PER_ROW = 8  # checking an index against its frequency builds the expected one
_DICTIONARY_BATCH, _RECORD_BATCH = 2, 3  # MessageHeader union tags in Arrow's Message.fbs
_U8, _U16, _I32, _U32 = struct.Struct("<B"), struct.Struct("<H"), struct.Struct("<i"), struct.Struct("<I")
# A time zone a worker names is looked up in the host's zone database: a zone name or a fixed offset,
# never a path (no leading "/", no "..", no "dateutil/" prefix that pandas would hand to dateutil).
_TIME_ZONE = re.compile(r"[A-Za-z][A-Za-z0-9_+-]{0,40}(/[A-Za-z0-9_+-]{1,40}){0,3}|[+-][0-9]{2}:[0-9]{2}")


class Refused(Exception):
    """The bytes are not a value the host rebuilds; keep them opaque."""


def preload(allowed_modules: Iterable[str]) -> None:
    """Import the libraries that values allowed by these module patterns need, if they are installed."""
    bases = {pattern.removesuffix(".*").partition(".")[0] for pattern in allowed_modules}
    wanted: list[str] = [name for name in ("numpy", "pandas") if name in bases]
    if "pandas" in wanted:
        wanted.append("pyarrow")
    for name in wanted:
        try:
            importlib.import_module(name)
        except ImportError:
            pass


def decode_checked(data: bytes, allowance: Allowance) -> object:
    """The numpy or pandas value of tagged worker bytes; raise Refused (or any error) otherwise."""
    kind = tagged.kind_of(data)
    if kind in tagged.NUMPY_KINDS:
        return _read_npy(_library("numpy"), kind, data, allowance)
    if kind in tagged.PANDAS_KINDS:
        return _read_arrow(_library("pandas"), _library("pyarrow"), kind, data, allowance)
    raise Refused("unknown value tag")


def _library(name: str) -> Any:
    try:
        return importlib.import_module(name)
    except ImportError:
        raise Refused(f"{name} is not installed on the host") from None


def _spend(allowance: Allowance, size: int) -> None:
    """Take ``size`` from the reply's allowance; a refused value, never built, takes nothing."""
    if size > allowance.decoded_bytes_left:
        raise Refused(f"decodes to more bytes than the reply's budget of {allowance.max_decoded_bytes}")
    allowance.decoded_bytes_left -= size


# --- numpy ----------------------------------------------------------------------


def _read_npy(np: ModuleType, kind: int, data: bytes, allowance: Allowance) -> object:
    stream = io.BytesIO(data)
    stream.seek(tagged.HEADER_BYTES)
    version = np.lib.format.read_magic(stream)
    if version == (1, 0):
        shape, _, dtype = np.lib.format.read_array_header_1_0(stream)
    elif version == (2, 0):
        shape, _, dtype = np.lib.format.read_array_header_2_0(stream)
    else:
        raise Refused(f"npy format version {version} is not read")
    if dtype.hasobject:
        raise Refused("an array of Python objects is a pickle")
    if any(type(n) is not int or n < 0 for n in shape):
        raise Refused("the npy header declares a malformed shape")
    count = math.prod(shape)
    declared, present = count * dtype.itemsize, len(data) - stream.tell()
    if declared != present:
        raise Refused(f"the npy header declares {declared} bytes of data, the value holds {present}")
    _spend(allowance, max(declared, count))
    stream.seek(tagged.HEADER_BYTES)
    array = np.lib.format.read_array(stream, allow_pickle=False)
    if kind == tagged.NUMPY_SCALAR:
        if array.ndim:
            raise Refused("a numpy scalar must be a 0-d array")
        return array[()]
    return array


# --- pandas, through Arrow ------------------------------------------------------------


def _read_arrow(pd: ModuleType, pa: ModuleType, kind: int, data: bytes, allowance: Allowance) -> object:
    if not tagged.pandas_supported(pd):
        raise Refused(f"pandas {pd.__version__} on the host; pandas values need pandas 3 or later")
    stream = pa.py_buffer(data)[tagged.HEADER_BYTES :]
    _refuse_compressed_batches(pa, stream)
    reader = pa.ipc.open_stream(stream)
    for field in reader.schema:
        if not _type_fits(pa, field.type):
            raise Refused(f"column {field.name[:80]!r} has Arrow type {str(field.type)[:80]}, which is not read")
    table = reader.read_all()
    table.validate(full=True)
    object_strings, has_frequency = _checked_restore(pa, table)
    _spend(allowance, _decoded_size(pa, table, object_strings, has_frequency))
    value = tagged.to_pandas(kind, table)
    _check_built(pd, kind, value)
    return value


def _refuse_compressed_batches(pa: ModuleType, stream: Any) -> None:
    messages = pa.ipc.MessageReader.open_stream(stream)
    while True:
        try:
            message = messages.read_next_message()
        except StopIteration:
            return
        if message.type != "schema" and _names_compression(message.metadata.to_pybytes()):
            raise Refused("a compressed Arrow batch is decompressed to the size it claims")


def _names_compression(metadata: bytes) -> bool:
    """Whether a Message flatbuffer's record batch carries a BodyCompression (field 3 of RecordBatch)."""
    message = _offset_at(metadata, 0)
    header_type, header = _field(metadata, message, 1), _field(metadata, message, 2)
    if header_type is None or header is None:
        raise Refused("an Arrow message without a header")
    batch, kind = _offset_at(metadata, header), _read(_U8, metadata, header_type)
    if kind == _DICTIONARY_BATCH:
        inner = _field(metadata, batch, 1)
        if inner is None:
            raise Refused("an Arrow dictionary batch without data")
        batch = _offset_at(metadata, inner)
    elif kind != _RECORD_BATCH:
        raise Refused("an Arrow message that is neither a schema nor a batch")
    return _field(metadata, batch, 3) is not None


def _read(layout: struct.Struct, buffer: bytes, position: int) -> int:
    if not 0 <= position <= len(buffer) - layout.size:
        raise Refused("an Arrow message points outside itself")
    value: int = layout.unpack_from(buffer, position)[0]
    return value


def _offset_at(buffer: bytes, position: int) -> int:
    return position + _read(_U32, buffer, position)


def _field(buffer: bytes, table: int, index: int) -> int | None:
    """Where field ``index`` of the flatbuffer table at ``table`` lies, or None if absent."""
    vtable = table - _read(_I32, buffer, table)
    slot = 4 + 2 * index
    if slot + 2 > _read(_U16, buffer, vtable):
        return None
    offset = _read(_U16, buffer, vtable + slot)
    return table + offset if offset else None


def _type_fits(pa: ModuleType, arrow_type: Any) -> bool:
    if pa.types.is_dictionary(arrow_type):
        return pa.types.is_integer(arrow_type.index_type) and _plain_type(pa, arrow_type.value_type)
    return _plain_type(pa, arrow_type)


def _plain_type(pa: ModuleType, arrow_type: Any) -> bool:
    if isinstance(arrow_type, pa.ExtensionType):
        return False
    types = pa.types
    if types.is_timestamp(arrow_type) and arrow_type.tz is not None:
        return _TIME_ZONE.fullmatch(arrow_type.tz) is not None and not arrow_type.tz.startswith("dateutil")
    return any(
        check(arrow_type)
        for check in (
            types.is_boolean,
            types.is_integer,
            types.is_floating,
            types.is_timestamp,
            types.is_duration,
            types.is_string,
            types.is_large_string,
        )
    )


def _checked_restore(pa: ModuleType, table: Any) -> tuple[set[str], bool]:
    """What the worker asks to restore after ``to_pandas``: the columns to turn back into Python
    strings (each must be one Arrow string column), and whether the index gets a frequency (a short
    string, which pandas parses and checks the index against)."""
    restore = json.loads((table.schema.metadata or {}).get(tagged.RESTORE, b"{}"))
    if type(restore) is not dict or type(restore.get("object_index", False)) is not bool:
        raise Refused("malformed restore metadata")
    freq = restore.get("index_freq")
    if freq is not None and (type(freq) is not str or not 0 < len(freq) <= _MAX_FREQUENCY_CHARS):
        raise Refused("malformed restore metadata")
    names = restore.get("object_columns", [])
    if type(names) is not list or any(type(name) is not str for name in names) or len(set(names)) != len(names):
        raise Refused("malformed restore metadata")
    for name in names:
        matches = table.schema.get_all_field_indices(name)
        if len(matches) != 1 or not _is_string(pa, table.schema.field(matches[0]).type):
            raise Refused("an object column that is not a column of strings")
    return set(names), freq is not None


def _is_string(pa: ModuleType, arrow_type: Any) -> bool:
    return bool(pa.types.is_string(arrow_type) or pa.types.is_large_string(arrow_type))


def _decoded_size(pa: ModuleType, table: Any, object_strings: set[str], has_frequency: bool) -> int:
    """An upper bound on what ``to_pandas`` allocates for ``table`` (pandas 3 keeps strings in Arrow)."""
    rows: int = table.num_rows
    size = 0
    for field, column in zip(table.schema, table.columns, strict=True):
        arrow_type = field.type
        if pa.types.is_dictionary(arrow_type):
            width = 8
            size += sum(chunk.dictionary.nbytes for chunk in column.chunks)
        elif _is_string(pa, arrow_type):
            width = 8
            size += column.nbytes
            if field.name in object_strings:
                size += rows * _PYTHON_STRING_BYTES
        else:
            width = max(arrow_type.bit_width // 8, 1)
        if column.null_count:
            width = max(width, 8) + 1  # nulls turn ints into floats, or add a mask
        size += rows * width
    if has_frequency:
        size += rows * _FREQUENCY_CHECK_BYTES_PER_ROW
    return size + 1024 * len(table.schema)


def _check_built(pd: ModuleType, kind: int, value: Any) -> None:
    if kind == tagged.DATAFRAME:
        frame = value
    elif kind in (tagged.SERIES, tagged.UNNAMED_SERIES):
        frame = value.to_frame() if type(value) is pd.Series else None
    else:
        frame = pd.DataFrame({"": False}, index=value) if isinstance(value, pd.Index) else None
    if type(frame) is not pd.DataFrame or not tagged.frame_fits(frame, pd):
        raise Refused("the Arrow metadata builds a pandas value outside the types that are read")
