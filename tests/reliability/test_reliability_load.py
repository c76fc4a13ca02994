"""Cases 3 and 7 of the reliability suite, short versions: overload at 10x capacity, and a soak at 70% load.

Also minimal reproductions of core bugs these cases found (now fixed), kept as regression tests.
"""

import asyncio
import gc
import weakref


from batchplex import BatchPolicy, Scheduler
from batchplex.testing import FakeAdapter
from benchmarks.reliability import harness, scenarios
from benchmarks.reliability.checks import assert_kept, check_rejection_cost



def test_overload_keeps_the_queue_bound_refuses_at_once_and_recovers():
    result = scenarios.run_short("overload", "overload")
    counts = result["outcomes"]["counts"]
    assert counts["full"] > counts["ok"], "10x capacity: most submits are refused"
    assert result["phases"]["overload"]["max_queue_depth"] == result["params"]["max_queue"]


def test_soak_at_70_percent_load_accounts_for_every_request(device):
    result = scenarios.run_short("soak", "soak", str(device))
    for name, accounting in result["accounting"].items():
        assert accounting["callers"]["ok"] > 100, f"{name}: the soak served requests"
        assert accounting["callers"]["invalid"] > 0, f"{name}: bad input was part of the mix"


def test_a_refused_submit_costs_the_same_whatever_the_queue_bound():
    result = harness.run(scenarios.rejection_cost(max_queues=(16, 4096), rejections=300))
    assert_kept(check_rejection_cost(result))


def test_finished_requests_are_not_kept_alive_by_the_deadline_heap():
    async def scenario() -> int:
        adapter = FakeAdapter(cost_of=lambda value: 2 if value < 0 else 1)
        async with Scheduler(autoload=False) as scheduler:
            scheduler.add_workload("w", adapter=adapter, model=lambda batch: batch * 2, policy=BatchPolicy(
                max_batch_size=4, max_wait_ms=10_000, bucket_edges=(1, 2)))
            # Alone in its bucket and far from its wait: queued for the whole test, with the nearest deadline.
            waiting = asyncio.ensure_future(scheduler.submit("w", -1.0, timeout=60))
            finished = []
            for _ in range(100):  # full batches of the other bucket run at once; their timeout is an hour
                futures = [scheduler.submit_nowait("w", float(v), timeout=3600) for v in range(4)]
                await asyncio.gather(*(asyncio.wrap_future(f) for f in futures))
                finished += [weakref.ref(f) for f in futures]
                del futures
            gc.collect()
            alive = sum(ref() is not None for ref in finished)
            waiting.cancel()
            return alive

    alive = asyncio.run(scenario())
    assert alive <= 80, f"{alive} of 400 finished requests (and their results) are still referenced"
