"""``Opaque``: a worker's value that the host keeps as bytes.

Owns: the public handle for outputs the host refuses to decode (instances of
user classes, functions, numpy object arrays, anything over a decoding
budget, numpy and pandas values on a host without those libraries).

Must never: run any of the value's code on the host by accident. An Opaque
compares by identity, hashes by identity, and its repr is built from the
type label the worker reported, truncated and escaped down to printable
ASCII, so no newline or terminal control sequence gets through. Pickling an
Opaque on the host (to cache it, say) pickles only its bytes, so unpickling
it gives back an Opaque, never the foreign object. The one way to rebuild
the real object on the host is :meth:`Opaque.unsafe_unpickle`, whose name
says what it does.

Passing an Opaque as an input to a later run sends its bytes to the worker,
which rebuilds the object there, under that run's import policy.
"""

from __future__ import annotations


class Opaque:
    __slots__ = ("_data", "reason", "type_name")

    def __init__(self, data: bytes, type_name: str, reason: str) -> None:
        self._data = bytes(data)
        self.type_name = type_name
        self.reason = reason

    @property
    def data(self) -> bytes:
        """The value as the worker serialized it: a cloudpickle stream, or the tagged
        ``.npy``/Arrow bytes of a numpy or pandas value (see ``sandbox.runtime.values``)."""
        return self._data

    @property
    def size(self) -> int:
        return len(self._data)

    def unsafe_unpickle(self) -> object:
        """Rebuild the object in *this* process.

        This runs whatever code the pickle names, with the host's rights.
        Only call it for values you trust, e.g. from a tenant that is you.
        Tagged numpy and pandas bytes are read without pickle, but without
        the host's budgets either.
        """
        from sandbox.runtime import values

        if values.kind_of(self._data) is not None:
            return values.decode(self._data)
        import cloudpickle

        return cloudpickle.loads(self._data)

    def __reduce__(self) -> tuple[type[Opaque], tuple[bytes, str, str]]:
        return (Opaque, (self._data, self.type_name, self.reason))

    def __repr__(self) -> str:
        label = self.type_name[:80].encode("unicode_escape").decode("ascii")
        return f"<Opaque {label!s} ({len(self._data)} bytes)>"
