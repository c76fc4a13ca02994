"""Property: under random arrivals, cancellations, timeouts and failing requests, every accepted request gets
exactly one outcome, and it is its own."""

import asyncio
import time

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import batchplex
from batchplex import BatchPolicy, Scheduler
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
