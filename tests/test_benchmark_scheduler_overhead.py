"""`benchmarks/scheduler_overhead.py`: one short point per system kind, its result check, and the thread round trip
it stamps on the results, on the CPU."""

from __future__ import annotations

import importlib
import os
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture
def overhead(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # the script imports `harness` and `peers` as its neighbours
    return importlib.import_module("scheduler_overhead")


@pytest.mark.parametrize("system", ["batchplex", "inline-floor"])
async def test_a_point_returns_every_submitter_its_own_values(overhead, system: str) -> None:
    args = overhead.parse_args(["--warmup-s", "0.1", "--duration-s", "0.2"])
    point = await overhead.measure_point(system, 8, args)
    assert point["requests"] > 0
    assert point["checked_results"] >= point["requests"]  # the window's requests, and the warm-up's and drain's
    assert point["cpu_us_per_req"] > 0


def test_the_result_check_names_a_request_that_got_another_ones_value(overhead) -> None:
    k = overhead.PAYLOADS_PER_SUBMITTER
    sent = [[0, 1], [0, 1]]
    received = [[torch.tensor([0.0]), torch.tensor([1.0])], [torch.tensor([float(k)]), torch.tensor([0.0])]]
    with pytest.raises(AssertionError, match=r"submitter 1 request #1 sent 5.0 and got 0.0 back"):
        overhead.check_results("x", 2, sent, received, total=4)


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="thread affinity is Linux's")
def test_the_thread_round_trip_is_measured_and_leaves_the_callers_cpus_as_they_were(overhead) -> None:
    allowed = os.sched_getaffinity(0)
    one_cpu = overhead.thread_round_trip_us(same_cpu=True, trips=200)
    two_cpus = overhead.thread_round_trip_us(same_cpu=False, trips=200)
    assert os.sched_getaffinity(0) == allowed
    assert 0 < one_cpu < 10_000
    if len(allowed) < 2:
        assert two_cpus is None
    else:
        assert 0 < two_cpus < 10_000
