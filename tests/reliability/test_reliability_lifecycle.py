"""Cases 4 and 5 of the reliability suite, short versions: cancellation storms and shutdown under load.

Also minimal reproductions of core bugs these cases found (now fixed), kept as regression tests.
"""

import asyncio
import gc
import threading
import time
import warnings

import pytest
import torch

from batchplex import Scheduler, SchedulerClosed
from batchplex.testing import FakeAdapter
from benchmarks.reliability import scenarios


def test_cancellation_storm_gives_no_wrong_result_no_hang_no_invalid_state():
    result = scenarios.run_short("cancel", "storm")
    assert result["cancel_requested"] > 100 and result["threaded"]["cancelled"] > 0


@pytest.mark.parametrize("label", ["drain", "no_drain"])
def test_shutdown_under_load_answers_every_accepted_request_once(label, device):
    result = scenarios.run_short("shutdown", label, str(device))
    assert result["close_s"] < 10


@pytest.mark.parametrize("label", ["threaded_drain", "threaded_no_drain"])
def test_shutdown_under_load_with_threaded_callers(label):
    scenarios.run_short("shutdown", label)


class SlowPrepare(FakeAdapter):
    """Holds ``prepare`` until released, to put a threaded submit in the middle of ``close()``."""

    def __init__(self, release: threading.Event) -> None:
        super().__init__()
        self.release = release

    def prepare(self, item, **params):
        assert self.release.wait(10)
        return super().prepare(item, **params)


def test_a_threaded_submit_that_overlaps_close_gets_scheduler_closed():
    release = threading.Event()
    scheduler = Scheduler(autoload=False)
    scheduler.add_workload("w", adapter=SlowPrepare(release), model=lambda batch: batch)
    scheduler.start()
    outcome = {}

    def caller() -> None:
        try:
            outcome["result"] = scheduler.submit_nowait("w", 1.0).result(timeout=5)
        except BaseException as error:  # noqa: BLE001 - the test inspects what the caller got
            outcome["error"] = error

    submitter = threading.Thread(target=caller)
    submitter.start()
    time.sleep(0.05)  # the caller is inside prepare()
    closer = threading.Thread(target=scheduler.close)
    closer.start()
    closer.join(5)
    release.set()
    submitter.join(5)
    assert not submitter.is_alive() and not closer.is_alive()
    assert "result" in outcome or isinstance(outcome.get("error"), SchedulerClosed), outcome


def test_close_releases_the_background_event_loop():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        scheduler = Scheduler(autoload=False)
        scheduler.add_workload("w", adapter="tensor", model=lambda batch: batch)
        scheduler.start()
        scheduler.submit_nowait("w", [1.0]).result(timeout=5)
        scheduler.close()
        del scheduler
        gc.collect()
    assert not [w for w in caught if issubclass(w.category, ResourceWarning)], [str(w.message) for w in caught]


@pytest.mark.gpu
def test_a_workload_on_a_bare_cuda_device_runs():
    """A bare ``"cuda"`` once killed every executor thread at start (set_device needs an index on torch 2.11)."""
    async def scenario() -> torch.Tensor:
        scheduler = Scheduler(autoload=False)
        scheduler.add_workload("w", adapter="tensor", model=lambda batch: batch * 2, device="cuda")
        await scheduler.__aenter__()
        try:
            return await asyncio.wait_for(scheduler.submit("w", torch.ones(2)), 10)
        finally:
            await asyncio.wait_for(scheduler.aclose(drain=False), 10)

    assert asyncio.run(scenario()).tolist() == [2.0, 2.0]
