"""API keys of ``sandbox serve``: making them, storing their digests, finding a key's tenant.

Owns: the key format (``sk-`` and 32 random bytes in URL-safe base64), the
keys file (TOML, one ``[keys]`` table mapping ``"sha256:<hex digest>"`` to a
tenant of the policy file), and the lookup of a presented key.

Must never: store, log or echo a key. Only digests are kept, in the file and
in memory, so a leaked keys file or a memory dump gives away no key.

Why a lookup by digest is constant-time enough: the presented key is hashed
(SHA-256 takes the same time for every key of a given length), and the
digest is then compared with ``hmac.compare_digest`` against every stored
digest, all of them every time, so neither the position of a match nor the
length of a common prefix shows in the response time. Even a plain dict
lookup by digest would leak only how a digest of the attacker's choosing
relates to the stored digests, which says nothing usable about a key with
256 bits of entropy; the full scan costs microseconds for any realistic
number of keys, and removes the question.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import tomllib
from collections.abc import Iterable
from pathlib import Path

_PREFIX = "sha256:"
_KEY_BYTES = 32


class KeysFileError(ValueError):
    """The keys file cannot be used; the message names the file and the entry."""


def new_key() -> str:
    return "sk-" + secrets.token_urlsafe(_KEY_BYTES)


def digest(key: str) -> str:
    return _PREFIX + hashlib.sha256(key.encode()).hexdigest()


def keys_line(key: str, tenant: str) -> str:
    """The line to add under ``[keys]`` for ``key``."""
    return f'"{digest(key)}" = "{tenant}"'


class Keys:
    """Stored digests and their tenants."""

    def __init__(self, tenants_by_digest: dict[str, str]) -> None:
        self._entries = [(bytes.fromhex(d.removeprefix(_PREFIX)), t) for d, t in tenants_by_digest.items()]

    @classmethod
    def load(cls, path: Path, tenants: Iterable[str]) -> Keys:
        """Read ``path``; every digest must be well formed and every tenant defined in the policy file."""
        try:
            document = tomllib.loads(path.read_text())
        except OSError as exc:
            raise KeysFileError(f"cannot read keys file {path}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise KeysFileError(f"keys file {path} is not valid TOML: {exc}") from None
        table = document.get("keys")
        extra = sorted(set(document) - {"keys"})
        if not isinstance(table, dict) or extra:
            raise KeysFileError(
                f'keys file {path} must hold exactly one table, [keys], mapping "sha256:<hex>" to a tenant '
                f"(generate entries with `sandbox key new TENANT`)"
            )
        known = set(tenants)
        for name, tenant in table.items():
            hexpart = name.removeprefix(_PREFIX)
            if not name.startswith(_PREFIX) or len(hexpart) != 64 or any(c not in "0123456789abcdef" for c in hexpart):
                raise KeysFileError(f'keys file {path}: {name[:20]!r}... is not "sha256:" and 64 lowercase hex digits')
            if tenant not in known:
                raise KeysFileError(
                    f"keys file {path}: a key is given to tenant {tenant!r}, which the policy file does not define "
                    f"(tenants: {', '.join(sorted(known))})"
                )
        return cls(dict(table))

    def tenant_of(self, key: str) -> str | None:
        """The tenant of ``key``, or None; every stored digest is compared, in constant time."""
        presented = hashlib.sha256(key.encode()).digest()
        found = None
        for stored, tenant in self._entries:
            if hmac.compare_digest(presented, stored):
                found = tenant
        return found
