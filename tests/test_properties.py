"""Property: under random arrivals, cancellations, timeouts and failing requests, every accepted request gets
exactly one outcome, and it is its own."""

import asyncio
import math
import time

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import batchplex
from batchplex import BatchPolicy, Scheduler
from batchplex.metrics import BusyTracker
from batchplex.testing import FakeAdapter

POISON = -1.0

request_plan = st.tuples(
    st.integers(min_value=0, max_value=3),                                   # ms to wait before submitting
    st.sampled_from(["plain", "cancel", "timeout", "poison"]),
    st.integers(min_value=0, max_value=4),                                   # ms before cancelling / the timeout
    st.integers(min_value=0, max_value=2),                                   # priority
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(plans=st.lists(request_plan, min_size=1, max_size=40),
       max_batch_size=st.integers(min_value=1, max_value=8),
       max_wait_ms=st.sampled_from([0, 1, 3]),
       run_ms=st.sampled_from([0, 1]),
       bucket_edges=st.sampled_from([(), (3, 1000)]),
       dispatch_when_idle=st.booleans())
def test_every_accepted_request_gets_exactly_one_outcome_its_own(plans, max_batch_size, max_wait_ms, run_ms,
                                                                  bucket_edges, dispatch_when_idle):
    asyncio.run(_exercise(plans, max_batch_size, max_wait_ms, run_ms, bucket_edges, dispatch_when_idle))


async def _exercise(plans, max_batch_size, max_wait_ms, run_ms, bucket_edges, dispatch_when_idle):
    def model(batch):
        if (batch == POISON).any():
            raise RuntimeError("poisoned batch")
        if run_ms:
            time.sleep(run_ms / 1000)
        return batch * 2

    policy = BatchPolicy(max_batch_size=max_batch_size, max_wait_ms=max_wait_ms, priority_levels=3,
                         bucket_edges=bucket_edges, dispatch_when_idle=dispatch_when_idle)
    adapter = FakeAdapter(cost_of=lambda value: 1 + int(abs(value)) % 5)
    async with Scheduler(autoload=False) as scheduler:
        scheduler.add_workload("w", adapter=adapter, model=model, policy=policy)

        async def one(index, plan):
            delay_ms, kind, when_ms, priority = plan
            await asyncio.sleep(delay_ms / 1000)
            value = POISON if kind == "poison" else float(index)
            timeout = (when_ms + 1) / 1000 if kind == "timeout" else None
            task = asyncio.ensure_future(scheduler.submit("w", value, priority=priority, timeout=timeout))
            if kind == "cancel":
                await asyncio.sleep(when_ms / 1000)
                task.cancel()
            try:
                return kind, value, await task
            except (asyncio.CancelledError, batchplex.BatchplexError) as error:
                return kind, value, error

        outcomes = await asyncio.gather(*(one(i, plan) for i, plan in enumerate(plans)))

    for kind, value, outcome in outcomes:
        if isinstance(outcome, torch.Tensor):
            assert kind != "poison"
            assert outcome.item() == value * 2, "a result reached the wrong caller"
        elif isinstance(outcome, asyncio.CancelledError):
            assert kind == "cancel"
        elif isinstance(outcome, batchplex.DeadlineExceeded):
            assert kind == "timeout"
        else:
            assert kind == "poison" and isinstance(outcome, batchplex.RequestFailed), (kind, outcome)
    stats = scheduler.statistics()["w"]
    assert stats["submitted"] == len(plans)
    assert stats["queue_depth"] == 0 and stats["in_flight"] == 0
    assert stats["completed"] + stats["failed"] + stats["timeouts"] + stats["cancelled"] == stats["submitted"]
    assert stats["failed"] == sum(1 for kind, _, _ in outcomes if kind == "poison")


span = st.tuples(st.floats(min_value=0, max_value=100, allow_nan=False),
                 st.floats(min_value=0, max_value=10, allow_nan=False))


@given(spans=st.lists(span, max_size=60), horizon_s=st.sampled_from([math.inf, 1000.0]))
def test_the_running_union_of_spans_in_any_order_is_their_union(spans, horizon_s):
    """Batches finish in any order and overlap: fed one at a time, the tracker's busy time is the spans' union."""
    tracker = BusyTracker(horizon_s)
    added = sum(tracker.add(start, start + length) for start, length in spans)
    union, covered = 0.0, -math.inf
    for start, end in sorted((start, start + length) for start, length in spans):
        if end > covered:
            union += end - max(start, covered)
            covered = end
    assert tracker.busy_s == pytest.approx(union, abs=1e-6) and added == pytest.approx(tracker.busy_s)


def test_spans_older_than_the_horizon_are_forgotten():
    tracker = BusyTracker(horizon_s=10.0)
    tracker.add(0.0, 5.0)
    tracker.add(20.0, 21.0)  # 15 s later: the first span is past the horizon
    tracker.add(1.0, 2.0)  # so this one, inside it, counts again (no batch reaches that far back)
    assert tracker.busy_s == pytest.approx(7.0)
    tracker.add(20.5, 22.0)
    assert tracker.busy_s == pytest.approx(8.0)
