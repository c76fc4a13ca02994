"""The once-per-process warning about a wide intra-op pool serving CUDA workloads (`batchplex._host_threads`)."""

import logging

import pytest
import torch

from batchplex import Scheduler, _host_threads
from batchplex.testing import FakeAdapter

CUDA = [torch.device("cuda", 0)]


@pytest.fixture
def pool(monkeypatch):
    """A fresh process-wide state, no OMP_NUM_THREADS, and an intra-op pool of the width the test sets."""
    monkeypatch.setattr(_host_threads, "_warned", False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    width = {"threads": 32}
    monkeypatch.setattr(torch, "get_num_threads", lambda: width["threads"])
    return width


def warnings_in(caplog):
    return [record for record in caplog.records if record.name == "batchplex" and "intra-op" in record.message]


def test_a_wide_pool_serving_cuda_is_named_once(pool, caplog):
    with caplog.at_level(logging.WARNING, logger="batchplex"):
        _host_threads.warn_if_wide_pool(CUDA)
        _host_threads.warn_if_wide_pool([torch.device("cpu"), torch.device("cuda", 1)])
    (record,) = warnings_in(caplog)
    assert "32 intra-op CPU threads" in record.message and "torch.set_num_threads(1)" in record.message


@pytest.mark.parametrize("case", ["cpu only", "narrow pool", "OMP_NUM_THREADS set"])
def test_no_warning_without_cause(pool, caplog, monkeypatch, case):
    devices = [torch.device("cpu")] if case == "cpu only" else CUDA
    if case == "narrow pool":
        pool["threads"] = _host_threads.WIDE_POOL
    if case == "OMP_NUM_THREADS set":
        monkeypatch.setenv("OMP_NUM_THREADS", "16")
    with caplog.at_level(logging.WARNING, logger="batchplex"):
        _host_threads.warn_if_wide_pool(devices)
    assert not warnings_in(caplog)


def test_add_workload_checks_the_devices_it_places_replicas_on(monkeypatch):
    seen = []
    monkeypatch.setattr("batchplex.scheduler.warn_if_wide_pool", seen.append)
    scheduler = Scheduler(autoload=False)
    scheduler.add_workload("w", adapter=FakeAdapter(), model=torch.nn.Identity(), device=["cpu", "cpu:0"])
    assert seen == [[torch.device("cpu"), torch.device("cpu", 0)]]


def test_a_refused_workload_does_not_use_up_the_warning(monkeypatch):
    seen = []
    monkeypatch.setattr("batchplex.scheduler.warn_if_wide_pool", seen.append)
    scheduler = Scheduler(autoload=False)
    with pytest.raises(ValueError, match="2 models for 1 devices"):  # refused after its devices are read
        scheduler.add_workload("w", adapter=FakeAdapter(), model=[torch.nn.Identity()] * 2, device="cpu")
    assert seen == []
