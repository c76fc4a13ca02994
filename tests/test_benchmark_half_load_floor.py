"""`benchmarks/half_load_floor.py`: its stand-in model and one measured window, on the CPU."""

from __future__ import annotations

import argparse
import importlib
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture
def floor(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # the script imports `harness` as its neighbour
    return importlib.import_module("half_load_floor")


def test_the_stand_in_sleeps_its_rows_share_of_a_full_batch(floor, monkeypatch: pytest.MonkeyPatch) -> None:
    slept: list[float] = []
    monkeypatch.setattr(floor, "time", SimpleNamespace(sleep=slept.append, perf_counter=time.perf_counter))
    model = floor.SleepingModel(run_ms=8.0, full=64)
    batch = torch.arange(16)
    assert model(batch) is batch
    model(torch.arange(64))
    assert slept == [pytest.approx(0.002), pytest.approx(0.008)]


async def test_a_window_batches_every_request_and_reads_the_oldest_wait_in_ms(floor) -> None:
    point = floor.Point("tiny", run_ms=1.0, rate=2000.0, batch=8, shape=(4,), dtype=torch.int32)
    window = await floor.measure_window(point, argparse.Namespace(duration=0.5, max_wait_ms=2.0, warmup=0.2), 0)
    assert window["requests"] > 500  # Poisson arrivals at 2,000/s for 0.5 s
    assert window["batched"] == window["requests"]  # every request of the window in one batch, none twice
    # batches fill in about 4 ms here, so most leave on the 2 ms timer: the oldest waited 2 ms, in ms, not s or us
    assert 2.0 <= window["oldest_wait_p99_ms"] < 50.0
    assert 0.0 < window["ran_fraction"] < 1.0
