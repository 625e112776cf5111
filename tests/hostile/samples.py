"""Read the shared hostile samples and the contract in their comment headers.

Each sample starts with comment lines ``# key: value``; the keys are
``attack``, ``inputs``, ``expect`` and ``then`` (see the samples' README).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

_HEADER_LINE = re.compile(r"^#\s*(\w+):\s*(.*?)\s*$")
KNOWN_INPUTS = frozenset({"canary", "port", "secret"})


@dataclass(frozen=True)
class Sample:
    """One hostile sample: its code and what its header promises."""

    name: str
    code: str
    attack: str
    inputs: frozenset[str]
    expect: frozenset[str]
    then: tuple[str, ...]


def parse(name: str, code: str) -> Sample:
    """Parse the comment header at the top of ``code``."""
    fields: dict[str, str] = {}
    for line in code.splitlines():
        if not line.startswith("#"):
            break
        match = _HEADER_LINE.match(line)
        if match:
            fields[match.group(1).lower()] = match.group(2)
    missing = {"attack", "expect", "then"} - fields.keys()
    if missing:
        raise ValueError(f"sample {name}: header lacks {', '.join(sorted(missing))}")
    # "inputs: none (the test sets ...)": drop parenthesised remarks, keep the names.
    input_words = re.sub(r"\(.*?\)", "", fields.get("inputs", "")).replace(",", " ").split()
    inputs = frozenset(word for word in input_words if word != "none")
    unknown = inputs - KNOWN_INPUTS
    if unknown:
        raise ValueError(f"sample {name}: unknown inputs {sorted(unknown)}")
    expect = frozenset(word.strip() for word in fields["expect"].split(",") if word.strip())
    then = tuple(clause.strip() for clause in fields["then"].split(";") if clause.strip())
    return Sample(name, code, fields["attack"], inputs, expect, then)


def load(directory: Path) -> list[Sample]:
    """Every ``*.py`` sample in ``directory``, sorted by name; empty if it is absent."""
    if not directory.is_dir():
        return []
    return [parse(path.stem, path.read_text()) for path in sorted(directory.glob("*.py"))]
