"""Tenant policies: the pydantic model and the TOML files that configure it.

Owns: what a policy is (``policies.model``) and how it is read from disk
(``policies.loader``). The bundled files live next to this module:
``default.toml`` documents every field with its default, and
``tenants.example.toml`` shows a multi-tenant setup.

Must never: import the supervisor or the runtime; a policy is plain data.
"""

from sandbox.policies.loader import PolicyFileError, load_policies
from sandbox.policies.model import DEFAULT_ALLOWED_MODULES, DEFAULT_DENIED_MODULES, LAYERS, Mount, Policy

__all__ = [
    "DEFAULT_ALLOWED_MODULES",
    "DEFAULT_DENIED_MODULES",
    "LAYERS",
    "Mount",
    "Policy",
    "PolicyFileError",
    "load_policies",
]
