"""The Python-level policy layer: which modules user code may import, which
builtins it sees.

Owns: the module allowlist check on every import route that user code can
reach without first escaping (the ``import`` statement, ``__import__``,
``from x import y`` of submodules, ``importlib.import_module`` and the
modules named inside pickled inputs), and the per-run builtins dict.

Must never: be mistaken for the security boundary. Anything here can be
climbed out of (``().__class__.__base__.__subclasses__()``, frames, ``gc``,
``os`` re-exported by an allowed module). It exists so that honest code gets
a clear :class:`ImportBlocked` naming the module and the tenant, and so
that a careless tenant cannot wander into ``os`` by accident. The wall is
``runtime.confine``.

Pattern semantics (documented in the README and ``policies/default.toml``):

* an allow entry ``json`` allows exactly the module ``json``;
* an allow entry ``json.*`` allows ``json`` and every submodule of it;
* a deny entry ``os`` denies ``os`` and every submodule; ``os.*`` means the same;
* deny always wins.

Only imports made by user code are checked. The standard library's own
internal imports (``json`` importing ``json.decoder``, ``asyncio`` importing
``socket``) go through the real ``__import__`` of their own module globals
and are never affected, so allowing ``json`` permits its internals.
"""

from __future__ import annotations

import builtins
import errno
import importlib
import importlib.util
import io
import pickle
import socket
import sys
import types
from collections.abc import Mapping, Sequence
from typing import Any

from sandbox.runtime import values


class ImportBlocked(ImportError):
    """Raised inside user code when the tenant's policy denies an import.

    It subclasses ImportError so that the usual ``try: import x`` /
    ``except ImportError`` fallbacks in user code keep working.
    """

    def __init__(self, module: str, tenant: str, denied_by: str | None = None) -> None:
        if denied_by is None:
            entry = module.partition(".")[0] + ".*"
            remedy = f'to allow it, add "{entry}" to allowed_modules'
        else:
            remedy = f'denied_modules has "{denied_by}", and a deny entry wins over allowed_modules'
        super().__init__(
            f"import of {module!r} is not allowed by the policy of tenant {tenant!r}; {remedy}", name=module
        )
        self.module = module
        self.tenant = tenant


def _matches(module: str, pattern: str, subtree: bool) -> bool:
    if pattern.endswith(".*"):
        base = pattern[:-2]
        return module == base or module.startswith(base + ".")
    if subtree:
        return module == pattern or module.startswith(pattern + ".")
    return module == pattern


class ImportPolicy:
    # Internal machinery that pickled inputs (cloudpickle functions, Opaque
    # values) need in order to be rebuilt. None of it grants new powers to
    # code that could already call every builtin.
    _PICKLE_PLUMBING = ("builtins", "copyreg", "_codecs", "cloudpickle", "cloudpickle.cloudpickle", "types")

    def __init__(self, allowed: list[str], denied: list[str], tenant: str) -> None:
        self.allowed = tuple(allowed)
        self.denied = tuple(denied)
        self.tenant = tenant
        self._cache: dict[str, bool] = {}

    def allows(self, module: str) -> bool:
        verdict = self._cache.get(module)
        if verdict is None:
            verdict = not any(_matches(module, p, subtree=True) for p in self.denied) and any(
                _matches(module, p, subtree=False) for p in self.allowed
            )
            self._cache[module] = verdict
        return verdict

    def check(self, module: str) -> None:
        if not self.allows(module):
            denied_by = next((p for p in self.denied if _matches(module, p, subtree=True)), None)
            raise ImportBlocked(module, self.tenant, denied_by)

    def check_unpickling(self, module: str) -> None:
        if module not in self._PICKLE_PLUMBING:
            self.check(module)


def explain_refused_sockets(tenant: str) -> None:
    """Make the socket seccomp refuses fail with the policy's reason.

    Why: without network, seccomp answers ``socket(AF_INET, ...)`` with
    EAFNOSUPPORT, and ``[Errno 97] Address family not supported by protocol``
    reads like a bug in the code. This only rewords that refusal, in the
    ``socket`` class every library goes through; code that reaches
    ``_socket`` directly still gets the kernel's errno. The wall is seccomp.
    """
    refused = PermissionError(
        errno.EACCES,
        f"network access is not allowed by the policy of tenant {tenant!r}; "
        'grant it with egress = ["HOST:PORT", ...] (or network = true) in its policy',
    )

    class PolicySocket(socket.socket):
        __slots__ = ()

        def __init__(self, family: int = -1, type: int = -1, proto: int = -1, fileno: int | None = None) -> None:
            try:
                super().__init__(family, type, proto, fileno)
            except OSError as exc:
                if exc.errno != errno.EAFNOSUPPORT:
                    raise
                raise PermissionError(*refused.args) from None

    PolicySocket.__name__ = PolicySocket.__qualname__ = "socket"
    PolicySocket.__module__ = "socket"
    socket.socket = PolicySocket  # type: ignore[misc]


class Guard:
    """Builds the builtins each run sees, with a checking ``__import__``."""

    def __init__(self, policy: ImportPolicy, removed_builtins: list[str]) -> None:
        self.policy = policy
        self._real_import = builtins.__import__
        shaped = dict(builtins.__dict__)
        for name in removed_builtins:
            shaped.pop(name, None)
        shaped["__import__"] = self._guarded_import
        self._template = shaped
        self.current_builtins: dict = shaped
        if policy.allows("importlib"):
            self._guard_import_module()

    def fresh_builtins(self) -> dict:
        """A new builtins dict per run, so one run's edits never reach the next."""
        self.current_builtins = dict(self._template)
        return self.current_builtins

    def _guarded_import(
        self,
        name: str,
        globals: Mapping[str, Any] | None = None,
        locals: Mapping[str, object] | None = None,
        fromlist: Sequence[str] = (),
        level: int = 0,
    ) -> types.ModuleType:
        if level:
            package = (globals or {}).get("__package__") or ""
            name = importlib.util.resolve_name("." * level + name, package)
        self.policy.check(name)
        if fromlist:
            self._real_import(name, globals, locals, (), 0)
            module = sys.modules[name]
            items = getattr(module, "__all__", ()) if "*" in fromlist else fromlist
            for item in items:
                # A submodule, loaded or not, is an import of its own; a
                # plain attribute of an allowed module is not.
                if isinstance(item, str) and _is_submodule(module, item):
                    self.policy.check(f"{name}.{item}")
        return self._real_import(name, globals, locals, fromlist, 0)

    def _guard_import_module(self) -> None:
        real = importlib.import_module
        guard = self

        def import_module(name: str, package: str | None = None) -> types.ModuleType:
            # Only calls made from user code are checked: library code that
            # imports dynamically must keep working.
            if sys._getframe(1).f_builtins is guard.current_builtins:
                guard.policy.check(importlib.util.resolve_name(name, package) if name.startswith(".") else name)
            return real(name, package)

        importlib.import_module = import_module


def _is_submodule(module: types.ModuleType, item: str) -> bool:
    attribute = getattr(module, item, None)
    if attribute is None:
        return True
    return isinstance(attribute, types.ModuleType) and attribute.__name__ == f"{module.__name__}.{item}"


class InputUnpickler(pickle.Unpickler):
    """Unpickles inputs inside the worker, under the tenant's import policy."""

    def __init__(self, data: bytes, policy: ImportPolicy) -> None:
        super().__init__(io.BytesIO(data))
        self._policy = policy

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("sandbox.opaque", "Opaque"):
            # An Opaque nested inside an input: the host pickles only its
            # bytes, and they are rebuilt here, under this run's policy.
            return self._load_opaque
        self._policy.check_unpickling(module)
        return super().find_class(module, name)

    def _load_opaque(self, data: bytes, type_name: str, reason: str) -> object:
        return load_input(data, self._policy)


def load_input(data: bytes, policy: ImportPolicy) -> object:
    """One input: a pickle, or the tagged .npy/Arrow bytes of a numpy or pandas value.

    A tagged value needs its library allowed, as its pickle would; pyarrow
    is the runtime's own plumbing and need not be.
    """
    kind = values.kind_of(data)
    if kind is None:
        return InputUnpickler(data, policy).load()
    policy.check("numpy" if kind in values.NUMPY_KINDS else "pandas")
    return values.decode(data)
