"""The scheduler end to end on the CPU: results, isolation of failures, deadlines, cancellation, back-pressure,
draining, the threaded API, padding and sharing a device."""

import asyncio
import dataclasses
import threading
import time

import pytest
import torch

import batchplex
from batchplex import BatchPolicy, BatchRecord, Scheduler
from batchplex.metrics import busy_time
from batchplex.testing import BatchLog, FakeAdapter, wait_until


def linear():
    torch.manual_seed(0)
    return torch.nn.Linear(4, 3).eval()


class Gate:
    """A model that blocks until released, so tests can hold a batch 'running' without sleeping."""

    def __init__(self):
        self.release = threading.Event()
        self.entered = threading.Event()
        self.batches = []

    def __call__(self, batch):
        self.batches.append(batch.reshape(-1).tolist())
        self.entered.set()
        assert self.release.wait(10), "test never released the gate"
        return batch



@pytest.fixture
async def scheduler():
    async with Scheduler(autoload=False) as s:
        yield s


async def test_every_request_gets_its_own_result(scheduler):
    model = linear()
    scheduler.add_workload("lin", adapter="tensor", model=model, policy=BatchPolicy(max_batch_size=16, max_wait_ms=5))
    xs = [torch.randn(4) for _ in range(100)]
    ys = await asyncio.gather(*(scheduler.submit("lin", x) for x in xs))
    with torch.no_grad():
        for x, y in zip(xs, ys):
            torch.testing.assert_close(y, model(x), rtol=1e-5, atol=1e-6)
    stats = scheduler.statistics()["lin"]
    assert stats["completed"] == 100 and stats["failed"] == 0
    assert stats["batches"] < 100 and stats["mean_batch_size"] > 1


async def test_bad_input_fails_at_submit_for_that_caller_only(scheduler):
    scheduler.add_workload("lin", adapter="tensor", model=linear(), adapter_options={"shape": (4,)})
    good = [asyncio.ensure_future(scheduler.submit("lin", torch.randn(4))) for _ in range(3)]
    with pytest.raises(batchplex.InvalidRequestError) as caught:
        await scheduler.submit("lin", torch.randn(5))
    assert caught.value.workload == "lin" and caught.value.rule == "same shape" and caught.value.value == (5,)
    assert "'lin'" in str(caught.value) and "(5,)" in str(caught.value)
    with pytest.raises(batchplex.InvalidRequestError, match="NaN"):
        await scheduler.submit("lin", torch.tensor([1.0, float("nan"), 0.0, 0.0]))
    assert all(result.shape == (3,) for result in await asyncio.gather(*good))
    assert scheduler.statistics()["lin"]["rejected_invalid"] == 2


@pytest.mark.parametrize("fault", ["model", "adapter"])
async def test_a_poisonous_request_fails_alone(scheduler, fault):
    poison = 13.0

    def model(batch):
        if fault == "model" and (batch == poison).any():
            raise ValueError("the model chokes on 13")
        return batch * 10

    adapter = FakeAdapter(fail_on=[poison] if fault == "adapter" else [])
    scheduler.add_workload("w", adapter=adapter, model=model, policy=BatchPolicy(max_batch_size=16, max_wait_ms=20))
    values = [float(v) for v in range(16)]
    outcomes = await asyncio.gather(*(scheduler.submit("w", v) for v in values), return_exceptions=True)
    for value, outcome in zip(values, outcomes):
        if value == poison:
            assert isinstance(outcome, batchplex.RequestFailed), outcome
            assert "13" in str(outcome) and outcome.__cause__ is not None
        else:
            assert outcome.item() == value * 10
    stats = scheduler.statistics()["w"]
    assert stats["failed"] == 1 and stats["completed"] == 15 and stats["retried_batches"] >= 1


async def test_out_of_memory_splits_the_batch_and_remembers_the_limit(scheduler):
    sizes = []

    def model(batch):
        sizes.append(len(batch))
        if len(batch) > 4:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return batch

    scheduler.add_workload("w", adapter=FakeAdapter(), model=model, policy=BatchPolicy(max_batch_size=16,
                                                                                        max_wait_ms=20))
    results = await asyncio.gather(*(scheduler.submit("w", float(v)) for v in range(16)))
    assert [r.item() for r in results] == [float(v) for v in range(16)]
    assert scheduler.statistics()["w"]["max_batch_size_now"] <= 4
    sizes.clear()
    await asyncio.gather(*(scheduler.submit("w", float(v)) for v in range(16)))
    assert sizes and max(sizes) <= 4


async def test_contract_errors_name_both_numbers(scheduler):
    class Short(FakeAdapter):
        def split(self, output, items):
            return [output[0]]

    scheduler.add_workload("w", adapter=Short(), model=lambda b: b, policy=BatchPolicy(max_batch_size=2,
                                                                                        max_wait_ms=50))
    outcomes = await asyncio.gather(scheduler.submit("w", 1.0), scheduler.submit("w", 2.0), return_exceptions=True)
    assert all(isinstance(o, batchplex.ContractError) for o in outcomes)
    assert "returned 1 results for a batch of 2" in str(outcomes[0])


async def test_deadline_passes_while_queued_and_the_request_never_runs(scheduler):
    gate = Gate()
    adapter = FakeAdapter()
    scheduler.pipeline_depth = 1
    scheduler.add_workload("w", adapter=adapter, model=gate, policy=BatchPolicy(max_batch_size=1, max_wait_ms=0))
    blocker = asyncio.ensure_future(scheduler.submit("w", 1.0))
    await wait_until(gate.entered.is_set)
    with pytest.raises(batchplex.DeadlineExceeded, match="timeout of 0.020s"):
        await scheduler.submit("w", 2.0, timeout=0.02)
    gate.release.set()
    assert (await blocker).item() == 1.0
    assert [2.0] not in adapter.collated_batches
    assert scheduler.statistics()["w"]["timeouts"] == 1


async def test_a_cancelled_caller_is_dropped_before_its_batch_runs(scheduler):
    adapter = FakeAdapter()
    scheduler.add_workload("w", adapter=adapter, model=lambda b: b, policy=BatchPolicy(max_batch_size=8,
                                                                                        max_wait_ms=30))
    kept = asyncio.ensure_future(scheduler.submit("w", 1.0))
    dropped = asyncio.ensure_future(scheduler.submit("w", 2.0))
    await asyncio.sleep(0)
    dropped.cancel()
    assert (await kept).item() == 1.0
    assert adapter.collated_batches == [[1.0]]
    assert scheduler.statistics()["w"]["cancelled"] == 1


async def test_a_full_queue_answers_at_once(scheduler):
    gate = Gate()
    scheduler.pipeline_depth = 1
    scheduler.add_workload("w", adapter=FakeAdapter(), model=gate,
                           policy=BatchPolicy(max_batch_size=1, max_wait_ms=0, max_queue=2))
    running = asyncio.ensure_future(scheduler.submit("w", 0.0))
    await wait_until(gate.entered.is_set)
    queued = [asyncio.ensure_future(scheduler.submit("w", float(v))) for v in (1, 2)]
    await asyncio.sleep(0)
    started = time.perf_counter()
    with pytest.raises(batchplex.QueueFullError, match="max_queue=2"):
        await scheduler.submit("w", 3.0)
    assert time.perf_counter() - started < 0.05
    gate.release.set()
    assert [r.item() for r in await asyncio.gather(running, *queued)] == [0.0, 1.0, 2.0]
    assert scheduler.statistics()["w"]["rejected_full"] == 1


async def test_leaving_the_context_drains_every_accepted_request():
    async with Scheduler(autoload=False) as scheduler:
        scheduler.add_workload("w", adapter=FakeAdapter(), model=lambda b: b + 1,
                               policy=BatchPolicy(max_batch_size=4, max_wait_ms=10_000))
        pending = [asyncio.ensure_future(scheduler.submit("w", float(v))) for v in range(10)]
        await asyncio.sleep(0)
    assert [p.result().item() for p in pending] == [float(v) + 1 for v in range(10)]
    with pytest.raises(batchplex.SchedulerClosed):
        await scheduler.submit("w", 1.0)


async def test_closing_without_draining_fails_queued_requests_with_a_clear_error():
    gate = Gate()
    scheduler = Scheduler(autoload=False, pipeline_depth=1)
    scheduler.add_workload("w", adapter=FakeAdapter(), model=gate, policy=BatchPolicy(max_batch_size=1,
                                                                                       max_wait_ms=0))
    await scheduler.__aenter__()
    running = asyncio.ensure_future(scheduler.submit("w", 1.0))
    await wait_until(gate.entered.is_set)
    queued = asyncio.ensure_future(scheduler.submit("w", 2.0))
    await asyncio.sleep(0)
    closing = asyncio.ensure_future(scheduler.aclose(drain=False))
    await asyncio.sleep(0.01)
    gate.release.set()
    await closing
    assert (await running).item() == 1.0
    with pytest.raises(batchplex.SchedulerClosed, match="drain=False"):
        await queued
    assert not [t for t in threading.enumerate() if t.name.startswith("batchplex-")]


def test_threaded_callers_use_start_close_and_submit_nowait():
    model = linear()
    with Scheduler(autoload=False) as scheduler:
        scheduler.add_workload("lin", adapter="tensor", model=model, policy=BatchPolicy(max_batch_size=8))
        xs = [torch.randn(4) for _ in range(40)]
        futures = []
        threads = [threading.Thread(target=lambda chunk: futures.extend(scheduler.submit_nowait("lin", x)
                                                                        for x in chunk), args=(xs[i::4],))
                   for i in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        results = {id(f): f.result(timeout=10) for f in futures}
        assert len(results) == 40
        with pytest.raises(batchplex.InvalidRequestError):
            scheduler.submit_nowait("lin", torch.randn(2))
    with torch.no_grad():
        for x in xs[:3]:
            matches = [y for y in results.values() if torch.allclose(y, model(x), atol=1e-6)]
            assert len(matches) == 1
    assert not [t for t in threading.enumerate() if t.name.startswith("batchplex-")]


async def test_preferred_sizes_pad_batches_and_results_drop_the_padding(scheduler):
    seen = []

    def model(batch):
        seen.append(len(batch))
        return batch * 2

    scheduler.add_workload("w", adapter=FakeAdapter(), model=model,
                           policy=BatchPolicy(max_batch_size=8, max_wait_ms=5, preferred_batch_sizes=(4, 8)))
    results = await asyncio.gather(*(scheduler.submit("w", float(v)) for v in range(3)))
    assert [r.item() for r in results] == [0.0, 2.0, 4.0]
    assert seen == [4]
    assert scheduler.statistics()["w"]["padding_waste"] == pytest.approx(0.25)


async def test_unknown_workload_and_bad_parameters(scheduler):
    scheduler.add_workload("w", adapter=FakeAdapter(), model=lambda b: b)
    with pytest.raises(batchplex.UnknownWorkloadError, match=r"'nope'.*known: w"):
        await scheduler.submit("nope", 1.0)
    with pytest.raises(batchplex.InvalidRequestError, match="priority"):
        await scheduler.submit("w", 1.0, priority=3)
    with pytest.raises(batchplex.InvalidRequestError, match="timeout"):
        await scheduler.submit("w", 1.0, timeout=-1)
    with pytest.raises(batchplex.RequestTooLargeError, match="last bucket edge"):
        scheduler.add_workload("b", adapter=FakeAdapter(cost_of=int), model=lambda b: b,
                               policy=BatchPolicy(bucket_edges=(8, 16)))
        await scheduler.submit("b", 17.0)
    with pytest.raises(ValueError, match="exists already"):
        scheduler.add_workload("w", adapter=FakeAdapter(), model=lambda b: b)


async def test_workloads_sharing_a_device_get_fair_device_time(scheduler):
    def slow(batch):
        time.sleep(0.02)
        return batch

    def fast(batch):
        time.sleep(0.002)
        return batch

    policy = BatchPolicy(max_batch_size=4, max_wait_ms=0)
    scheduler.add_workload("slow", adapter=FakeAdapter(), model=slow, policy=policy)
    scheduler.add_workload("fast", adapter=FakeAdapter(), model=fast, policy=policy)
    stop = time.monotonic() + 1.0

    async def submitter(name):  # closed loop; 32 of them keep both queues backlogged
        while time.monotonic() < stop:
            await scheduler.submit(name, 1.0)

    await asyncio.gather(*(submitter(name) for name in ("slow", "fast") for _ in range(32)))
    stats = scheduler.statistics()
    slow_time, fast_time = stats["slow"]["device_time_s"], stats["fast"]["device_time_s"]
    # without fair sharing by device time, the slow model would take ~10x the fast one's device time
    assert 0.4 < slow_time / fast_time < 2.5, (slow_time, fast_time)
    assert stats["fast"]["completed"] > 3 * stats["slow"]["completed"]


async def test_a_dedicated_executor_runs_while_a_blocking_model_holds_the_shared_one(scheduler):
    gate = Gate()  # a forward that blocks its thread, as one with host syncs does
    policy = BatchPolicy(max_batch_size=1, max_wait_ms=0)
    scheduler.add_workload("blocking", adapter=FakeAdapter(), model=gate, policy=policy)
    scheduler.add_workload("shared", adapter=FakeAdapter(), model=lambda b: b + 1, policy=policy)
    scheduler.add_workload("own", adapter=FakeAdapter(), model=lambda b: b + 2, policy=policy,
                           dedicated_executor=True)
    blocked = [asyncio.ensure_future(scheduler.submit("blocking", 1.0)) for _ in range(2)]  # both shared slots
    await asyncio.to_thread(gate.entered.wait, 10)
    shared = asyncio.ensure_future(scheduler.submit("shared", 1.0))
    assert (await scheduler.submit("own", 1.0)).item() == 3.0
    assert not shared.done() and not any(future.done() for future in blocked)  # still behind the gate
    assert any(thread.name.startswith("batchplex-cpu-own-") for thread in threading.enumerate())
    gate.release.set()
    assert (await shared).item() == 2.0 and [(await f).item() for f in blocked] == [1.0, 1.0]
    stats = scheduler.statistics()
    assert stats["own"]["completed"] == 1 and stats["shared"]["completed"] == 1


async def test_a_workload_on_two_devices_uses_both_replicas(scheduler):
    # "cpu" and "cpu:0" are distinct device keys, so this exercises two lanes (one replica each) on a CPU machine
    calls = {}

    class Tagged(torch.nn.Module):
        def forward(self, batch):
            calls[id(self)] = calls.get(id(self), 0) + 1
            time.sleep(0.005)
            return batch

    scheduler.add_workload("w", adapter=FakeAdapter(), model=Tagged(), device=["cpu", "cpu:0"],
                           policy=BatchPolicy(max_batch_size=2, max_wait_ms=0))
    results = await asyncio.gather(*(scheduler.submit("w", float(v)) for v in range(40)))
    assert [r.item() for r in results] == [float(v) for v in range(40)]
    assert len(calls) == 2 and min(calls.values()) >= 2


async def test_dispatch_when_idle_sends_a_batch_without_waiting_and_still_batches_under_load(scheduler):
    gate = Gate()
    scheduler.pipeline_depth = 1
    scheduler.add_workload("w", adapter=FakeAdapter(), model=gate,
                           policy=BatchPolicy(max_batch_size=8, max_wait_ms=60_000, dispatch_when_idle=True))
    first = asyncio.ensure_future(scheduler.submit("w", 1.0))
    await wait_until(gate.entered.is_set)  # the device was idle: it left at once despite a one-minute wait
    rest = [asyncio.ensure_future(scheduler.submit("w", float(v))) for v in range(2, 6)]
    await asyncio.sleep(0.01)
    gate.release.set()
    assert [r.item() for r in await asyncio.gather(first, *rest)] == [1.0, 2.0, 3.0, 4.0, 5.0]
    assert gate.batches == [[1.0], [2.0, 3.0, 4.0, 5.0]]  # the busy device let the others queue into one batch


async def test_a_broken_stage_fails_its_batch_instead_of_hanging(scheduler):
    class ExecutorBug(BaseException):  # escapes the stages' `except Exception`, like a bug would
        pass

    def model(batch):
        raise ExecutorBug("not a request's fault")

    scheduler.add_workload("w", adapter=FakeAdapter(), model=model, policy=BatchPolicy(max_batch_size=2,
                                                                                        max_wait_ms=1))
    outcomes = await asyncio.wait_for(asyncio.gather(scheduler.submit("w", 1.0), scheduler.submit("w", 2.0),
                                                     return_exceptions=True), timeout=10)
    assert all(isinstance(o, ExecutorBug) for o in outcomes)
    assert scheduler.statistics()["w"]["failed"] == 2


async def test_batch_records_show_where_each_batch_spent_its_trip():
    from batchplex.builtin_adapters import TensorAdapter

    class SlowCollate(TensorAdapter):
        def collate(self, items, device, batch_size):
            time.sleep(0.02)
            return super().collate(items, device, batch_size)

    def slow_model(batch):
        time.sleep(0.03)
        return batch

    log = BatchLog()
    async with Scheduler(autoload=False, plugins=[log]) as scheduler:
        scheduler.add_workload("w", adapter=SlowCollate(), model=slow_model,
                               policy=BatchPolicy(max_batch_size=4, max_wait_ms=1))
        await asyncio.gather(*(scheduler.submit("w", torch.zeros(2)) for _ in range(16)))
        stats = scheduler.statistics()["w"]
    assert len(log.records) == stats["batches"] >= 4
    for record in log.records:
        assert record.collate_s >= 0.02 and record.launch_s >= 0.03 and record.finish_s >= 0
        assert record.pipeline_s >= record.collate_s + record.launch_s + record.finish_s
    assert stats["stage_ms_mean"]["collate"] >= 20 and stats["stage_ms_mean"]["launch"] >= 30
    assert stats["pipeline_ms"]["p50"] >= 50


def test_busy_time_counts_overlapping_batches_once():
    def record(start, end):
        return BatchRecord(workload="w", device="cpu", size=1, padded_size=1, cost=1, padded_cost=1, max_wait_s=0.0,
                           run_s=0.0 if start is None else end - start, failed=0, retried=start is None,
                           device_start_s=start, device_end_s=end)

    spans = [(0.0, 1.0), (0.5, 2.0), (0.6, 0.9), (3.0, 4.0), (None, None), (4.0, 4.5)]
    assert busy_time(record(*span) for span in spans) == pytest.approx(3.5)  # [0, 2] + [3, 4.5]
    assert busy_time([]) == 0.0
    other_device = dataclasses.replace(record(0.0, 1.0), device="cuda:0")
    with pytest.raises(ValueError, match="one device"):
        busy_time([record(0.0, 1.0), other_device])


async def test_batches_of_dedicated_executors_overlap_on_the_device_clock(device):
    """Two workloads with executors of their own run at the same time: the union of their device spans is the busy
    time, well under the sum of their run times. On CUDA the spans are read on the device's clock, from events."""
    log = BatchLog()

    def slow(batch):  # on CUDA a kernel that keeps the GPU busy for a while, on the CPU a sleep
        if batch.is_cuda:
            torch.cuda._sleep(20_000_000)  # about 10 ms of GPU time
        else:
            time.sleep(0.02)
        return batch + 1

    policy = BatchPolicy(max_batch_size=1, max_wait_ms=0)
    async with Scheduler(autoload=False, plugins=[log]) as scheduler:
        for name in ("a", "b"):
            scheduler.add_workload(name, adapter=FakeAdapter(), model=slow, device=device, policy=policy,
                                   dedicated_executor=True)
        started = time.perf_counter()
        results = await asyncio.gather(*(scheduler.submit(name, float(i)) for i in range(6) for name in "ab"))
        wall = time.perf_counter() - started
    records = log.records
    assert [r.item() for r in results] == [float(i) + 1 for i in range(6) for _ in "ab"]
    assert len(records) == 12 and all(r.device_start_s is not None for r in records)
    first, last = min(r.device_start_s for r in records), max(r.device_end_s for r in records)
    assert last - first <= wall  # one clock for both executors: together the spans fit in the time taken
    if device.type == "cpu":  # there the clock is perf_counter itself
        assert started <= first and last <= started + wall
    total = sum(r.run_s for r in records)
    assert busy_time(records) < 0.8 * total  # the two workloads' batches ran side by side
