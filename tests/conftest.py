"""Shared test fixtures. Every test runs against real worker processes."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import pytest_asyncio
import uvloop

from sandbox import Policy, Sandbox
from tests.hostile.checks import Targets, open_targets

REPO = Path(__file__).resolve().parent.parent
HOSTILE = REPO.parent / "shared" / "hostile"
IS_ROOT = os.geteuid() == 0


def pytest_asyncio_loop_factories(config, item):
    # The supervisor's production loop is uvloop; tests that need the plain
    # asyncio loop (embedding) create one themselves.
    return {"uvloop": uvloop.new_event_loop}


def quick_policy(**overrides) -> Policy:
    """Short limits, so that tests about limits do not wait long."""
    values = {"wall_time_s": 5.0, "cpu_time_s": 3.0}
    values.update(overrides)
    return Policy(**values)


@pytest_asyncio.fixture
async def sandbox():
    async with Sandbox(quick_policy(), workers=2) as sb:
        yield sb


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def shared_sandbox():
    """One Sandbox for a whole module of tests that do not damage it."""
    async with Sandbox(quick_policy(), workers=2) as sb:
        yield sb


def descendants() -> list[psutil.Process]:
    """Every live process below this test process (zombies excluded)."""
    alive = []
    for proc in psutil.Process().children(recursive=True):
        try:
            if proc.status() != psutil.STATUS_ZOMBIE:
                alive.append(proc)
        except psutil.NoSuchProcess:
            pass
    return alive


@pytest.fixture
def targets(harness) -> Iterator[Targets]:
    """Fresh canaries and listeners for one hostile run; each hostile module defines ``harness``."""
    with open_targets(harness) as opened:
        yield opened
