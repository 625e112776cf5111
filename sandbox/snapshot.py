"""Decode a worker's exported variables without trusting them.

Owns: the only place where the host turns worker bytes into Python objects.

Must never: call ``pickle.loads``/``cloudpickle.loads``, import a module a
pickle names, call anything but the constructors of the inert types below,
or recurse over a structure the worker built.

A value becomes a real object only if it is made entirely of inert builtin
data: None, bool, int, float, complex, str, bytes, bytearray, list, tuple,
dict, set, frozenset, and the ``datetime`` types, ``Decimal``, ``Fraction``
and ``UUID``. Anything else, and anything over a budget, comes back as an
:class:`~sandbox.opaque.Opaque` that holds the bytes. numpy and pandas
values that the worker tagged as ``.npy`` or Arrow bytes (never pickles)
are checked and built by ``sandbox.values``, under the same rule: refused
means Opaque.

Why the pure-Python unpickler: the C one keeps its memo in an array sized by
the largest index it sees, so a 20-byte pickle with ``LONG_BINPUT 2**31``
makes it allocate and zero gigabytes. ``pickle._Unpickler`` keeps the memo in
a dict, and lets us wrap every opcode to count it, which bounds the work
before any structure exists. What loading cannot see (depth, and shared
references that expand exponentially when walked, like a 60-level doubling
chain) is checked afterwards by one iterative walk that stops at its budget.
Keys of dicts and sets are checked before insertion for nesting depth (the C
``tuple.__hash__`` recursion has no guard), for expanded size (a tuple
re-hashes shared members every time) and for repeated hashes (integer hashes
are not randomized, so a crafted dict could make insertion quadratic).

The allowed constructors are called only the way their own ``__reduce__``
calls them: with plain scalar arguments, whose strings may not add up to more
than the pickle itself holds (one memoized string fed to a million
``Decimal`` calls would), ``Fraction`` from two integers only (from a string
or a ``Decimal`` it computes ``10**exponent``), ``UUID`` created empty and
given exactly its own fields. Text opcodes that parse an integer from a line
of unbounded length are refused; protocol 5 never emits them.

Most outputs are one scalar, pickled by the worker as a handful of opcodes.
:func:`_decode_scalar` reads exactly those shapes byte by byte, with no
pickle machinery at all, and hands anything else to the unpickler above.
"""

from __future__ import annotations

import datetime
import decimal
import fractions
import io
import pickle
import struct
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, ClassVar, cast

from sandbox import values
from sandbox.opaque import Opaque
from sandbox.runtime.values import kind_of


class _Refused(Exception):
    """The value is not inert data, or is over budget; keep it opaque."""


def _fraction(*terms: object) -> fractions.Fraction:
    """``Fraction`` as its ``__reduce__`` calls it: from a numerator and a denominator."""
    if len(terms) != 2 or any(type(term) is not int for term in terms):
        raise _Refused("Fraction is rebuilt only from two integers")
    return fractions.Fraction(*cast("tuple[int, int]", terms))


_ALLOWED_GLOBALS: dict[tuple[str, str], object] = {
    ("builtins", "complex"): complex,
    ("datetime", "datetime"): datetime.datetime,
    ("datetime", "date"): datetime.date,
    ("datetime", "time"): datetime.time,
    ("datetime", "timedelta"): datetime.timedelta,
    ("datetime", "timezone"): datetime.timezone,
    ("decimal", "Decimal"): decimal.Decimal,
    ("fractions", "Fraction"): _fraction,
    ("uuid", "UUID"): uuid.UUID,
}
_SCALARS = frozenset(
    {
        type(None),
        bool,
        int,
        float,
        complex,
        str,
        bytes,
        bytearray,
        datetime.datetime,
        datetime.date,
        datetime.time,
        datetime.timedelta,
        datetime.timezone,
        decimal.Decimal,
        fractions.Fraction,
    }
)
_SEQUENCES = frozenset({list, tuple, set, frozenset})
_ARGUMENT_TYPES = frozenset({type(None), bool, int, float, str, bytes, datetime.timedelta, datetime.timezone})
_UUID_FIELDS = frozenset({"int", "is_safe"})


@dataclass(frozen=True)
class Budget:
    """Limits on decoding; the defaults suit JSON-like results.

    ``max_ops`` is shared by all the outputs of one reply (see
    :class:`Allowance`), and an opcode that creates a container costs
    ``CONTAINER_OP_COST``: memory, not just time, is what a hostile reply
    spends, and an empty set takes two hundred bytes of the host's for one
    byte of pickle. Two million units hold a list of a million floats.

    ``max_decoded_bytes`` bounds what the numpy and pandas values of one
    reply may take once built (see ``sandbox.values``); the host sets it to
    the tenant's ``max_reply_bytes``, so only a value that expands on
    decoding is refused.
    """

    max_ops: int = 2_000_000  # pickle opcodes executed, weighted
    max_nodes: int = 1_000_000  # objects visited, counting every shared reference again
    max_depth: int = 100  # nesting of containers
    max_int_bytes: int = 4096  # one int, in two's-complement bytes
    max_equal_hashes: int = 16  # distinct keys of one dict/set sharing a hash
    max_decoded_bytes: int = 32 * 1024 * 1024  # numpy and pandas values of one reply, as built


CONTAINER_OP_COST = 8


class Allowance:
    """The decoding work left for one reply, shared by all its outputs."""

    __slots__ = ("decoded_bytes_left", "max_decoded_bytes", "ops_left")

    def __init__(self, budget: Budget) -> None:
        self.ops_left = budget.max_ops
        self.max_decoded_bytes = budget.max_decoded_bytes
        self.decoded_bytes_left = budget.max_decoded_bytes


class _RestrictedUnpickler(pickle._Unpickler):
    dispatch: ClassVar[dict[int, Any]] = dict(pickle._Unpickler.dispatch)
    # The load() machinery the handlers below use; typeshed leaves it undeclared.
    read: Callable[[int], bytes]
    append: Callable[[object], None]
    stack: list[Any]
    metastack: list[list[Any]]

    def __init__(self, data: bytes, budget: Budget, allowance: Allowance) -> None:
        super().__init__(io.BytesIO(data), fix_imports=False)
        self.budget = budget
        self.allowance = allowance
        self.key_nodes_left = budget.max_nodes
        self.argument_bytes_left = len(data)
        self.hash_counts: dict[int, dict[int, int]] = {}

    def find_class(self, module: str, name: str) -> object:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except (KeyError, TypeError):
            raise _Refused(f"{module}.{name} is not an inert type") from None

    def persistent_load(self, pid: object) -> None:
        raise _Refused("persistent references are not data")

    def admit_keys(self, container: object, keys: Iterable[object]) -> None:
        counts = self.hash_counts.setdefault(id(container), {})
        for key in keys:
            if type(key) in (tuple, frozenset):
                self.key_nodes_left = _check_key(key, self.budget.max_depth, self.key_nodes_left)
            digest = hash(key)
            counts[digest] = counts.get(digest, 0) + 1
            if counts[digest] > self.budget.max_equal_hashes:
                raise _Refused("too many keys share one hash")

    def admit_arguments(self, args: object) -> None:
        if type(args) is not tuple or any(type(arg) not in _ARGUMENT_TYPES for arg in args):
            raise _Refused("constructor arguments are not plain scalars")
        self.argument_bytes_left -= sum(len(arg) for arg in args if type(arg) in (str, bytes))
        if self.argument_bytes_left < 0:
            raise _Refused("constructor arguments repeat more data than the pickle holds")


_Handler = Callable[[_RestrictedUnpickler], None]


def _counted(handler: _Handler, cost: int) -> _Handler:
    def run(self: _RestrictedUnpickler) -> None:
        allowance = self.allowance
        allowance.ops_left -= cost
        if allowance.ops_left < 0:
            raise _Refused("the reply needs more decoding work than the budget allows")
        handler(self)

    return run


def _load_long(size_format: str) -> _Handler:
    size = struct.Struct(size_format)

    def run(self: _RestrictedUnpickler) -> None:
        (n,) = size.unpack(self.read(size.size))
        if n < 0 or n > self.budget.max_int_bytes:
            raise _Refused("integer over budget")
        self.append(pickle.decode_long(self.read(n)))

    return run


def _load_setitem(self: _RestrictedUnpickler) -> None:
    self.admit_keys(self.stack[-3], (self.stack[-2],))
    pickle._Unpickler.load_setitem(self)  # type: ignore[attr-defined]


def _load_setitems(self: _RestrictedUnpickler) -> None:
    mark = self.metastack[-1] if self.metastack else []
    self.admit_keys(mark[-1] if mark else None, self.stack[0::2])
    pickle._Unpickler.load_setitems(self)  # type: ignore[attr-defined]


def _load_items_into_set(self: _RestrictedUnpickler) -> None:
    mark = self.metastack[-1] if self.metastack else []
    self.admit_keys(mark[-1] if mark else None, self.stack)
    pickle._Unpickler.load_additems(self)  # type: ignore[attr-defined]


def _load_frozenset(self: _RestrictedUnpickler) -> None:
    self.admit_keys(object(), self.stack)
    pickle._Unpickler.load_frozenset(self)  # type: ignore[attr-defined]


def _load_reduce(self: _RestrictedUnpickler) -> None:
    args = self.stack.pop()
    self.admit_arguments(args)
    self.stack[-1] = self.stack[-1](*args)


def _load_newobj(self: _RestrictedUnpickler) -> None:
    args = self.stack.pop()
    cls = self.stack.pop()
    if cls is not uuid.UUID or type(args) is not tuple or args:
        raise _Refused("only UUID is created empty and filled in afterwards")
    self.append(uuid.UUID.__new__(uuid.UUID))


def _load_build(self: _RestrictedUnpickler) -> None:
    state = self.stack.pop()
    target = self.stack[-1]
    if type(target) is not uuid.UUID or hasattr(target, "int") or not _is_uuid_state(state):
        raise _Refused("only a new UUID restores state, and only its own fields")
    target.__setstate__(state)  # type: ignore[attr-defined]  # UUID has one; typeshed omits it


def _is_uuid_state(state: object) -> bool:
    """True for what ``UUID.__getstate__`` returns: a 128-bit int and maybe a safety flag."""
    if type(state) is not dict or not state.keys() <= _UUID_FIELDS:
        return False
    number, safe = state.get("int"), state.get("is_safe")
    return type(number) is int and 0 <= number < 1 << 128 and (safe is None or (type(safe) is int and safe in (0, -1)))


def _refuse_opcode(self: _RestrictedUnpickler) -> None:
    raise _Refused("the pickle uses an opcode that inert data never needs")


def _build_dispatch() -> None:
    op = pickle
    table = _RestrictedUnpickler.dispatch
    for code in (
        op.PERSID,
        op.BINPERSID,
        op.INST,
        op.OBJ,
        op.EXT1,
        op.EXT2,
        op.EXT4,
        op.NEWOBJ_EX,
        op.NEXT_BUFFER,
        op.READONLY_BUFFER,
        op.DICT,
        op.INT,
        op.LONG,
        op.GET,
        op.PUT,
    ):
        table[code[0]] = _refuse_opcode
    table[op.LONG1[0]] = _load_long("<B")
    table[op.LONG4[0]] = _load_long("<i")
    table[op.SETITEM[0]] = _load_setitem
    table[op.SETITEMS[0]] = _load_setitems
    table[op.ADDITEMS[0]] = _load_items_into_set
    table[op.FROZENSET[0]] = _load_frozenset
    table[op.REDUCE[0]] = _load_reduce
    table[op.NEWOBJ[0]] = _load_newobj
    table[op.BUILD[0]] = _load_build
    containers = {
        code[0]
        for code in (
            op.EMPTY_LIST,
            op.EMPTY_DICT,
            op.EMPTY_SET,
            op.EMPTY_TUPLE,
            op.MARK,
            op.LIST,
            op.TUPLE,
            op.TUPLE1,
            op.TUPLE2,
            op.TUPLE3,
            op.FROZENSET,
            op.BYTEARRAY8,
            op.REDUCE,
            op.NEWOBJ,
        )
    }
    for opcode, handler in list(table.items()):
        table[opcode] = _counted(handler, CONTAINER_OP_COST if opcode in containers else 1)


_build_dispatch()


def _check_key(root: object, max_depth: int, nodes_left: int) -> int:
    """Walk a tuple or frozenset key before it is hashed; return the node budget left."""
    stack: list[tuple[Any, int]] = [(root, 1)]  # worker-built objects, dispatched on their exact type
    while stack:
        obj, depth = stack.pop()
        nodes_left -= 1
        if nodes_left < 0:
            raise _Refused("keys expand to more objects than the budget")
        if depth > max_depth:
            raise _Refused("nested deeper than the budget")
        if type(obj) in (tuple, frozenset):
            stack.extend((child, depth + 1) for child in obj)
    return nodes_left


def _walk(root: object, budget: Budget) -> None:
    """Check depth and expanded size of a loaded value, without recursion."""
    nodes_left = budget.max_nodes
    stack: list[tuple[Any, int]] = [(root, 1)]  # worker-built objects, dispatched on their exact type
    while stack:
        obj, depth = stack.pop()
        nodes_left -= 1
        if nodes_left < 0:
            raise _Refused("expands to more objects than the budget")
        if depth > budget.max_depth:
            raise _Refused("nested deeper than the budget")
        kind = type(obj)
        if kind in _SEQUENCES:
            stack.extend((child, depth + 1) for child in obj)
        elif kind is dict:
            for key, value in obj.items():
                stack.append((key, depth + 1))
                stack.append((value, depth + 1))
        elif kind is int:
            if obj.bit_length() > budget.max_int_bytes * 8:
                raise _Refused("integer over budget")
        elif kind is uuid.UUID:
            if type(obj.int) is not int or not 0 <= obj.int < 1 << 128:
                raise _Refused("malformed UUID")
        elif kind not in _SCALARS:
            raise _Refused(f"unexpected type {kind.__name__}")


_NOT_A_SCALAR = object()
_PROTO, _FRAME, _MEMOIZE, _STOP = 0x80, 0x95, 0x94, 0x2E
_FIXED = {0x4E: None, 0x88: True, 0x89: False}  # NONE, NEWTRUE, NEWFALSE
_INTS = {0x4B: struct.Struct("<B"), 0x4D: struct.Struct("<H"), 0x4A: struct.Struct("<i")}  # BININT1/2, BININT
_SIZED: dict[int, tuple[struct.Struct, Callable[[bytes], object]]] = {  # opcode: (length field, decoder)
    0x8C: (struct.Struct("<B"), lambda raw: str(raw, "utf-8")),  # SHORT_BINUNICODE
    0x58: (struct.Struct("<I"), lambda raw: str(raw, "utf-8")),  # BINUNICODE
    0x43: (struct.Struct("<B"), bytes),  # SHORT_BINBYTES
    0x42: (struct.Struct("<I"), bytes),  # BINBYTES
    0x8A: (struct.Struct("<B"), lambda raw: int.from_bytes(raw, "little", signed=True)),  # LONG1
}
_FLOAT = struct.Struct(">d")  # BINFLOAT (0x47)


def _decode_scalar(data: bytes) -> object:
    """One scalar pickled by protocol 4/5, or _NOT_A_SCALAR for any other shape."""
    if len(data) < 4 or data[0] != _PROTO or data[1] not in (4, 5) or data[-1] != _STOP:
        return _NOT_A_SCALAR
    pos = 2
    if data[pos] == _FRAME:
        pos += 9
    end = len(data) - 1
    if pos < end and data[end - 1] == _MEMOIZE:
        end -= 1
    if pos >= end:
        return _NOT_A_SCALAR
    op, pos = data[pos], pos + 1
    try:
        if op in _FIXED and pos == end:
            return _FIXED[op]
        if op in _INTS and pos + _INTS[op].size == end:
            return _INTS[op].unpack_from(data, pos)[0]
        if op == 0x47 and pos + _FLOAT.size == end:
            return _FLOAT.unpack_from(data, pos)[0]
        if op in _SIZED:
            length_field, decode = _SIZED[op]
            (length,) = length_field.unpack_from(data, pos)
            pos += length_field.size
            if pos + length == end:
                return decode(data[pos:end])
    except (struct.error, UnicodeDecodeError):
        pass
    return _NOT_A_SCALAR


def decode_value(data: bytes, type_label: str, budget: Budget = Budget(), allowance: Allowance | None = None) -> object:
    """The value if it is inert data within budget, else an Opaque holding it.

    Pass the same ``allowance`` for every output of one reply.
    """
    value = _decode_scalar(data)
    if value is not _NOT_A_SCALAR:
        return value
    allowance = allowance or Allowance(budget)
    try:
        if kind_of(data) is not None:
            return values.decode_checked(data, allowance)
        value = _RestrictedUnpickler(data, budget, allowance).load()
        _walk(value, budget)
        return value
    except (_Refused, values.Refused) as exc:
        return Opaque(data, type_label, str(exc))
    except RecursionError:
        return Opaque(data, type_label, "nested too deeply")
    except Exception as exc:  # malformed stream: still just bytes to us
        return Opaque(data, type_label, f"not decodable: {type(exc).__name__}")
