"""Check and serialize a run's inputs on the host.

Owns: the rule for what may be an input name, and the encoding of input
values: cloudpickle, so that functions and lambdas can be inputs, except
for an ``Opaque``, whose bytes are passed through untouched so that the
worker (and never the host) rebuilds the object, and for the numpy and
pandas values that ``sandbox.runtime.values`` covers, which travel as
``.npy`` or Arrow bytes, the same way they come back.

Must never: bind a name that would replace the code's builtins or other
dunder machinery, or let a serialization failure surface as anything but a
clear ``InputError``.
"""

from __future__ import annotations

import keyword
from collections.abc import Mapping

import cloudpickle

from sandbox.errors import InputError
from sandbox.opaque import Opaque
from sandbox.runtime import values


def encode_inputs(inputs: Mapping[str, object] | None) -> dict[str, bytes]:
    if inputs is None:
        return {}
    if not isinstance(inputs, Mapping):
        raise InputError(f"inputs must be a mapping of variable names to values, not {type(inputs).__name__}")
    encoded = {}
    for name, value in inputs.items():
        check_name(name)
        if isinstance(value, Opaque):
            encoded[name] = value.data
            continue
        try:
            encoded[name] = values.encode(value) or cloudpickle.dumps(value, protocol=5)
        except Exception as exc:
            raise InputError(f"input {name!r} cannot be serialized: {type(exc).__name__}: {exc}") from exc
    return encoded


def check_name(name: object) -> None:
    if not isinstance(name, str) or not name.isidentifier() or keyword.iskeyword(name):
        raise InputError(f"input name {name!r} is not a valid Python identifier")
    if name.startswith("__") and name.endswith("__"):
        raise InputError(f"input name {name!r} is reserved (dunder names are interpreter machinery)")
