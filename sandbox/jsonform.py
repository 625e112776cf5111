"""The JSON form of values, results and errors, shared by ``sandbox serve`` and ``sandbox.client``.

Owns: one documented, reversible mapping between the values a run takes and
returns and JSON, and the JSON bodies of a ``Result`` and of a
``SandboxError``. The server encodes with it, the client decodes with it, so
that a run through HTTP returns the same Python values and the same classes
as a run in-process.

The tagged form. JSON's own types stand for themselves: ``null``, booleans,
integers, finite floats, strings, arrays (lists) and objects (dicts whose keys
are all strings and none of which is ``"$type"``). Every other value is an
object with a ``"$type"`` key:

==================  ===========================================================
``$type``           fields
==================  ===========================================================
``bytes``           ``base64`` (standard alphabet, padded)
``bytearray``       ``base64``
``tuple``           ``items``: array of tagged values
``set``             ``items``
``frozenset``       ``items``
``dict``            ``items``: array of ``[key, value]`` pairs, both tagged (a
                    dict with a non-string key, or with a ``"$type"`` key)
``float``           ``value``: ``"nan"``, ``"inf"`` or ``"-inf"``
``complex``         ``real``, ``imag`` (tagged floats)
``decimal``         ``value``: ``str(Decimal)`` (exact, ``NaN`` and ``Infinity`` included)
``fraction``        ``numerator``, ``denominator`` (integers)
``uuid``            ``value``: canonical hex form
``datetime``        ``value``: ISO 8601 (``datetime.isoformat``; a fixed UTC
                    offset is kept, a timezone's display name is not)
``date``, ``time``  ``value``: ISO 8601
``timedelta``       ``days``, ``seconds``, ``microseconds`` (as ``timedelta`` normalises them)
``timezone``        ``seconds``: the UTC offset
``opaque``          ``type_name``, ``reason``, ``base64`` (the worker's bytes,
                    unchanged: passed back as an input they reach a worker,
                    never the host's unpickler)
==================  ===========================================================

Must never: decode a value into anything but inert data or an ``Opaque``
(nothing here imports or calls what a document names), or import a
third-party package: ``import sandbox`` and the worker side stay free of the
HTTP stack.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime
import decimal
import fractions
import math
import uuid
from collections.abc import Callable, Mapping
from typing import Any

from sandbox import errors
from sandbox.opaque import Opaque
from sandbox.result import Result, RunStats

TAG = "$type"
JSON = Any  # what json.dumps accepts and json.loads returns


class JSONFormError(ValueError):
    """A document is not in the tagged form; the message names the offending path."""


# --- values ------------------------------------------------------------------------------------------------


def encode(value: object) -> JSON:
    """The tagged JSON form of ``value`` (see the module docstring)."""
    if value is None or isinstance(value, (bool, str)):
        return value
    kind = type(value)
    if kind is int:
        return value
    if kind is float:
        return value if math.isfinite(value) else {TAG: "float", "value": repr(value)}  # type: ignore[arg-type]
    if kind is list:
        return [encode(item) for item in value]  # type: ignore[attr-defined]
    if kind is dict:
        items: dict[object, object] = value  # type: ignore[assignment]
        if all(type(key) is str for key in items) and TAG not in items:
            return {key: encode(item) for key, item in items.items()}
        return {TAG: "dict", "items": [[encode(key), encode(item)] for key, item in items.items()]}
    encoder = _ENCODERS.get(kind)
    if encoder is None:
        raise JSONFormError(f"a {kind.__name__} has no JSON form")
    return {TAG: _TAG_OF[kind], **encoder(value)}


def decode(document: JSON, path: str = "$") -> object:
    """The value whose tagged form is ``document``; ``JSONFormError`` names the path of a bad part."""
    if document is None or isinstance(document, (bool, int, float, str)):
        return document
    if isinstance(document, list):
        return [decode(item, f"{path}[{index}]") for index, item in enumerate(document)]
    if not isinstance(document, dict):
        raise JSONFormError(f"{path}: {type(document).__name__} is not JSON")
    if TAG not in document:
        return {key: decode(item, f"{path}.{key}") for key, item in document.items()}
    tag = document[TAG]
    decoder = _DECODERS.get(tag) if isinstance(tag, str) else None
    if decoder is None:
        raise JSONFormError(f"{path}: unknown {TAG} {tag!r}; known: {', '.join(sorted(_DECODERS))}")
    try:
        return decoder(document, path)
    except JSONFormError:
        raise
    except (KeyError, TypeError, ValueError, ArithmeticError) as exc:
        raise JSONFormError(f"{path}: not a valid {tag} ({type(exc).__name__}: {exc})") from None


def _b64(data: bytes) -> dict[str, str]:
    return {"base64": base64.b64encode(data).decode("ascii")}


def unbase64(text: object, path: str) -> bytes:
    """Bytes from standard, padded base64; ``JSONFormError`` naming ``path`` otherwise."""
    if not isinstance(text, str):
        raise JSONFormError(f"{path}: expected a base64 string, got {type(text).__name__}")
    try:
        return base64.b64decode(text, validate=True)
    except ValueError:
        raise JSONFormError(f"{path}: not valid base64") from None


def _items(document: dict[str, JSON], path: str) -> list[object]:
    items = document["items"]
    if not isinstance(items, list):
        raise JSONFormError(f"{path}.items: expected an array")
    return [decode(item, f"{path}.items[{index}]") for index, item in enumerate(items)]


def _decode_dict(document: dict[str, JSON], path: str) -> dict[object, object]:
    pairs = document["items"]
    if not isinstance(pairs, list) or not all(isinstance(pair, list) and len(pair) == 2 for pair in pairs):
        raise JSONFormError(f"{path}.items: expected an array of [key, value] pairs")
    return {
        decode(key, f"{path}.items[{i}][0]"): decode(item, f"{path}.items[{i}][1]")
        for i, (key, item) in enumerate(pairs)
    }


def _float(text: object) -> float:
    if text not in ("nan", "inf", "-inf"):
        raise ValueError(f"{text!r} is not nan, inf or -inf")
    return float(str(text))


def _number(document: JSON, path: str) -> float:
    value = decode(document, path)
    if type(value) not in (int, float):
        raise TypeError(f"{path}: expected a number")
    return float(value)  # type: ignore[arg-type]


def _integer(value: object) -> int:
    if type(value) is not int:
        raise TypeError(f"expected an integer, got {type(value).__name__}")
    return value


def _iso(document: dict[str, JSON]) -> str:
    value = document["value"]
    if not isinstance(value, str):
        raise TypeError("value must be an ISO 8601 string")
    return value


_ENCODERS: dict[type, Callable[[Any], dict[str, JSON]]] = {
    bytes: _b64,
    bytearray: lambda value: _b64(bytes(value)),
    tuple: lambda value: {"items": [encode(item) for item in value]},
    set: lambda value: {"items": [encode(item) for item in value]},
    frozenset: lambda value: {"items": [encode(item) for item in value]},
    complex: lambda value: {"real": encode(value.real), "imag": encode(value.imag)},
    decimal.Decimal: lambda value: {"value": str(value)},
    fractions.Fraction: lambda value: {"numerator": value.numerator, "denominator": value.denominator},
    uuid.UUID: lambda value: {"value": str(value)},
    datetime.datetime: lambda value: {"value": value.isoformat()},
    datetime.date: lambda value: {"value": value.isoformat()},
    datetime.time: lambda value: {"value": value.isoformat()},
    datetime.timedelta: lambda value: {
        "days": value.days,
        "seconds": value.seconds,
        "microseconds": value.microseconds,
    },
    datetime.timezone: lambda value: {"seconds": value.utcoffset(None).total_seconds()},
    Opaque: lambda value: {"type_name": value.type_name, "reason": value.reason, **_b64(value.data)},
}
_TAG_OF = {kind: kind.__name__.lower() for kind in _ENCODERS}
_DECODERS: dict[str, Callable[[dict[str, JSON], str], Any]] = {
    "bytes": lambda d, p: unbase64(d["base64"], f"{p}.base64"),
    "bytearray": lambda d, p: bytearray(unbase64(d["base64"], f"{p}.base64")),
    "tuple": lambda d, p: tuple(_items(d, p)),
    "set": lambda d, p: set(_items(d, p)),
    "frozenset": lambda d, p: frozenset(_items(d, p)),
    "dict": _decode_dict,
    "float": lambda d, p: _float(d["value"]),
    "complex": lambda d, p: complex(_number(d["real"], f"{p}.real"), _number(d["imag"], f"{p}.imag")),
    "decimal": lambda d, p: decimal.Decimal(_iso(d)),
    "fraction": lambda d, p: fractions.Fraction(_integer(d["numerator"]), _integer(d["denominator"])),
    "uuid": lambda d, p: uuid.UUID(_iso(d)),
    "datetime": lambda d, p: datetime.datetime.fromisoformat(_iso(d)),
    "date": lambda d, p: datetime.date.fromisoformat(_iso(d)),
    "time": lambda d, p: datetime.time.fromisoformat(_iso(d)),
    "timedelta": lambda d, p: datetime.timedelta(
        days=_integer(d["days"]), seconds=_integer(d["seconds"]), microseconds=_integer(d["microseconds"])
    ),
    "timezone": lambda d, p: datetime.timezone(datetime.timedelta(seconds=float(d["seconds"]))),
    "opaque": lambda d, p: Opaque(unbase64(d["base64"], f"{p}.base64"), str(d["type_name"]), str(d["reason"])),
}


def encode_mapping(values: Mapping[str, object]) -> dict[str, JSON]:
    """A mapping of variable names to values, each value in tagged form."""
    return {name: encode(value) for name, value in values.items()}


def decode_mapping(document: object, path: str) -> dict[str, object]:
    if document is None:
        return {}
    if not isinstance(document, dict):
        raise JSONFormError(f"{path}: expected an object, got {type(document).__name__}")
    try:
        return {name: decode(value, f"{path}.{name}") for name, value in document.items()}
    except RecursionError:
        raise JSONFormError(f"{path}: nested too deeply") from None


def encode_files(files: Mapping[str, bytes]) -> dict[str, str]:
    """Files as ``{"path": "<base64>"}``, the form requests carry them in."""
    return {path: base64.b64encode(data).decode("ascii") for path, data in files.items()}


def decode_files(document: object, path: str) -> dict[str, bytes]:
    if not isinstance(document, dict):
        raise JSONFormError(f"{path}: expected an object mapping paths to base64, got {type(document).__name__}")
    return {name: unbase64(text, f"{path}.{name}") for name, text in document.items()}


# --- results -----------------------------------------------------------------------------------------------

# The fields of a Result and of its RunStats (read once: dataclasses.fields
# and asdict cost tens of microseconds, paid on every run otherwise), and how
# each Result field travels; any other field (one a later version adds)
# travels in the tagged form.
_STATS_FIELDS = tuple(item.name for item in dataclasses.fields(RunStats))
_FIELD_CODECS: dict[str, tuple[Callable[[Any], JSON], Callable[[Any, str], Any]]] = {
    "outputs": (encode_mapping, decode_mapping),
    "files": (encode_files, decode_files),
    "stats": (
        lambda stats: {name: getattr(stats, name) for name in _STATS_FIELDS},
        lambda document, path: RunStats(**{name: document[name] for name in _STATS_FIELDS}),
    ),
}
_RESULT_CODECS = tuple(
    (item.name, *_FIELD_CODECS.get(item.name, (encode, decode))) for item in dataclasses.fields(Result)
)


def result_body(result: Result) -> dict[str, JSON]:
    """``{"ok": true, ...}``: every field of ``result``, as ``POST /v1/runs`` answers it."""
    body: dict[str, JSON] = {"ok": True}
    for name, encoder, _ in _RESULT_CODECS:
        body[name] = encoder(getattr(result, name))
    return body


def result_from_body(body: Mapping[str, JSON]) -> Result:
    """The ``Result`` whose body is ``body`` (the inverse of ``result_body``)."""
    return Result(**{name: decoder(body[name], f"$.{name}") for name, _, decoder in _RESULT_CODECS})


# --- errors ------------------------------------------------------------------------------------------------


def error_classes() -> dict[str, type[errors.SandboxError]]:
    """Every ``SandboxError`` class by name (the names the API speaks), workflow errors included."""
    import sandbox.workflow  # noqa: F401  (defines WorkflowError and WorkflowDefinitionError)

    found: dict[str, type[errors.SandboxError]] = {}
    pending: list[type[errors.SandboxError]] = [errors.SandboxError]
    while pending:
        cls = pending.pop()
        found[cls.__name__] = cls
        pending.extend(cls.__subclasses__())
    return found


_ERROR_MESSAGE_FIELDS = ("message", "stdout", "stderr")


def error_body(error: errors.SandboxError) -> dict[str, JSON]:
    """``{"ok": false, "error": {...}, "stdout", "stderr"}`` for a failed run.

    ``error`` holds ``type`` (the exception's class name) and ``message``,
    plus ``details``: the attributes the class adds (``kind``, ``limit_s``,
    ``node``, ``traceback``, ...) in the tagged form, and ``causes``: the
    attributes that are errors themselves (a ``WorkflowError``'s ``cause``),
    each in this same form.
    """
    return {"ok": False, "error": error_document(error), "stdout": error.stdout, "stderr": error.stderr}


def error_document(error: errors.SandboxError) -> dict[str, JSON]:
    attributes = {
        name: value
        for name, value in vars(error).items()
        if name not in _ERROR_MESSAGE_FIELDS and not name.startswith("_")
    }
    return {
        "type": type(error).__name__,
        "message": error.message,
        "details": {n: encode(v) for n, v in attributes.items() if not isinstance(v, errors.SandboxError)},
        "causes": {n: error_document(v) for n, v in attributes.items() if isinstance(v, errors.SandboxError)},
    }


def error_from_body(body: Mapping[str, JSON]) -> errors.SandboxError:
    """The ``SandboxError`` of a failed run's body: the same class, message and attributes."""
    return error_from_document(body["error"], stdout=body.get("stdout", ""), stderr=body.get("stderr", ""))


def error_from_document(document: Mapping[str, JSON], *, stdout: str = "", stderr: str = "") -> errors.SandboxError:
    """Rebuilt without calling the class's own ``__init__``, whose keyword
    arguments differ per class: the base initialiser sets what every error
    has, and the class's own attributes are restored as they were sent. A
    type this version does not know comes back as a plain ``SandboxError``."""
    cls = error_classes().get(document["type"], errors.SandboxError)
    error = cls.__new__(cls)
    errors.SandboxError.__init__(error, document["message"], stdout=stdout, stderr=stderr)
    for name, value in (document.get("details") or {}).items():
        setattr(error, name, decode(value, f"$.error.details.{name}"))
    for name, value in (document.get("causes") or {}).items():
        cause = error_from_document(value, stdout=stdout, stderr=stderr)
        setattr(error, name, cause)
        error.__cause__ = cause
    return error
