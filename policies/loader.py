"""Read tenant policies from TOML files.

Owns: the file format and its error reporting::

    [base]              # optional: fields every tenant of this file starts from
    wall_time_s = 10

    [tenants.alpha]     # tenant "alpha" = built-in defaults + base + these
    memory_mb = 128
    allowed_modules = ["math", "json"]

A directory is read as every ``*.toml`` in it, in name order; each file's
``[base]`` applies to its own tenants, and a tenant defined twice is an error.

Must never: accept a file partly. An invalid file raises one
:class:`PolicyFileError` that names the file, each bad tenant and every bad
field in it, and nothing is returned.
"""

from __future__ import annotations

import difflib
import tomllib
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from pydantic_core import ErrorDetails

from sandbox.policies.model import Policy


class PolicyFileError(ValueError):
    """One or more policy files are invalid; the message lists every problem."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("invalid policy file:\n" + "\n".join(f"  - {p}" for p in problems))
        self.problems = problems


def load_policies(path: str | Path) -> dict[str, Policy]:
    """Load a TOML policy file, or a directory of them, into ``{tenant: Policy}``."""
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.toml"))
        if not files:
            raise PolicyFileError([f"{path}: the directory holds no *.toml file"])
    elif path.is_file():
        files = [path]
    else:
        raise PolicyFileError([f"{path}: no such file or directory"])

    policies: dict[str, Policy] = {}
    origin: dict[str, Path] = {}
    problems: list[str] = []
    for file in files:
        for tenant, policy_or_errors in _load_file(file).items():
            if isinstance(policy_or_errors, list):
                problems.extend(policy_or_errors)
            elif tenant in policies:
                problems.append(f"{file}: tenant {tenant!r} is already defined in {origin[tenant]}")
            else:
                policies[tenant] = policy_or_errors
                origin[tenant] = file
    if problems:
        raise PolicyFileError(problems)
    return policies


def _load_file(file: Path) -> dict[str, Policy | list[str]]:
    try:
        document = tomllib.loads(file.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        return {"": [f"{file}: {exc}"]}
    problems = [
        f"{file}: unknown top-level section {key!r} (expected [base] and [tenants.NAME])"
        for key in document
        if key not in ("base", "tenants")
    ]
    base = document.get("base", {})
    tenants = document.get("tenants", {})
    if not isinstance(base, dict):
        problems.append(f"{file}: [base] must be a table")
        base = {}
    if not isinstance(tenants, dict) or not tenants:
        problems.append(f"{file}: no [tenants.NAME] table")
        tenants = {}
    base_errors = _field_errors(base) if base else {}
    problems.extend(f"{file}: [base]: {p}" for p in base_errors.values())
    result: dict[str, Policy | list[str]] = {"": problems} if problems else {}
    for tenant, overrides in tenants.items():
        if not isinstance(overrides, dict):
            result[tenant] = [f"{file}: tenant {tenant!r}: must be a table"]
            continue
        errors = _field_errors({**base, **overrides})
        if errors:
            # A field [base] got wrong is reported once, under [base], not
            # again for every tenant that inherits it.
            inherited = {field for field in base_errors if field not in overrides}
            result[tenant] = [f"{file}: tenant {tenant!r}: {p}" for f, p in errors.items() if f not in inherited]
        else:
            result[tenant] = Policy(**{**base, **overrides})
    return result


def _field_errors(fields: dict[str, Any]) -> dict[str, str]:
    """Each invalid field of a policy, keyed by its name, in the project's words."""
    try:
        Policy(**fields)
    except ValidationError as exc:
        return {str(error["loc"][0]) if error["loc"] else "": _describe(error) for error in exc.errors()}
    return {}


def _describe(error: ErrorDetails) -> str:
    location = ".".join(str(part) for part in error["loc"])
    if error["type"] == "extra_forbidden":
        close = difflib.get_close_matches(location, Policy.model_fields, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else "; policies/default.toml lists every field"
        return f"unknown field {location!r}{hint}"
    return f"{location or 'policy'}: {error['msg']}"
