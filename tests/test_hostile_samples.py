"""Every shared hostile sample holds against a root supervisor in a throwaway PID namespace.

The samples live in ``../shared/hostile/`` (``tests.conftest.HOSTILE``) and
are read, never copied. Each one's header names its inputs, the outcomes it
accepts and, in ``then:``, what must hold afterwards; ``tests.hostile.contract``
maps every clause to a check, and every run must also leave the host intact.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from sandbox.policies import Policy
from tests.conftest import HOSTILE
from tests.hostile import samples
from tests.hostile.client import HarnessProcess
from tests.hostile.contract import KNOWN_OUTCOMES, check_sample, clauses_for

POLICY = {"wall_time_s": 1.5, "cpu_time_s": 1, "max_output_bytes": 256 * 1024}
TENANTS = {"default": POLICY, "other": POLICY}
SAMPLES = samples.load(HOSTILE)


@pytest.fixture(scope="module")
def harness() -> Iterator[HarnessProcess]:
    process = HarnessProcess(TENANTS)
    yield process
    process.close()


@pytest.mark.skipif(not SAMPLES, reason=f"no hostile samples at {HOSTILE}")
def test_every_sample_header_parses_into_a_known_contract() -> None:
    for sample in SAMPLES:
        assert sample.expect and sample.expect <= KNOWN_OUTCOMES, sample.name
        clauses_for(sample)


@pytest.mark.skipif(not SAMPLES, reason=f"no hostile samples at {HOSTILE}")
@pytest.mark.parametrize("sample", SAMPLES, ids=[s.name for s in SAMPLES])
def test_sample_holds(harness: HarnessProcess, sample: samples.Sample) -> None:
    check_sample(harness, Policy(**POLICY), sample)
