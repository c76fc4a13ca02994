"""Continuous (iteration-level) batching with a counting step adapter: who joins which step, the token budget and
the active cap, priorities, deadlines, cancellation, streams, back-pressure, failures and closing.

The adapter below is a real `StepAdapter` without a model: a sequence's tokens count up from its prompt's last id.
With ``gated=True`` every step waits for the test to allow it, so tests decide what happens between two steps and
assert on step membership, never on timing.
"""

import asyncio
import itertools
import threading

import pytest

from batchplex import (DeadlineExceeded, InvalidRequestError, PolicyError, QueueFullError, RequestFailed,
                       RequestTooLargeError, SchedulerClosed)
from batchplex.testing import wait_until
from batchplex.continuous import ContinuousPolicy, ContinuousWorkload, StepAdapter, StepOutput


class CountingAdapter(StepAdapter):
    """Prompts are non-empty lists of ints; each step gives every sequence the next int after its last token."""

    name = "counting"

    def __init__(self, gated: bool = False, fail_start: bool = False) -> None:
        self.gate = threading.Semaphore(0) if gated else None
        self.fail_start = fail_start
        self.fail_next_step = False
        self.live: dict[int, list[int]] = {}  # handle -> [next token, tokens left]
        self.admitted: list[int] = []
        self.released: list[int] = []
        self.closed = False
        self._handles = itertools.count()

    def allow(self, steps: int) -> None:
        self.gate.release(steps)

    def prepare(self, item, *, max_new_tokens=3):
        if not (isinstance(item, list) and item and all(type(x) is int for x in item)):
            raise InvalidRequestError("a prompt is a non-empty list of ints", rule="non-empty list of ints",
                                      value=item)
        return list(item), max_new_tokens

    def cost(self, prepared):
        return len(prepared[0])

    def start(self, model, device, policy):
        if self.fail_start:
            raise RuntimeError("no model")

    def admit(self, prepared):
        handle = next(self._handles)
        self.live[handle] = [prepared[0][-1] + 1, prepared[1]]
        self.admitted.append(handle)
        return handle

    def step(self):
        if self.gate is not None:
            assert self.gate.acquire(timeout=10), "the test never allowed this step"
        if self.fail_next_step:
            self.fail_next_step = False
            raise RuntimeError("device fault")
        outputs = []
        for handle, state in self.live.items():
            token = state[0]
            state[0] += 1
            state[1] -= 1
            outputs.append(StepOutput(handle, [token], state[1] == 0))
        return outputs

    def release(self, handle):
        self.released.append(handle)
        del self.live[handle]

    def close(self):
        self.closed = True

    def memory(self):
        return {"live": len(self.live)}



@pytest.fixture
async def workload():
    started = []

    def make(adapter=None, **policy):
        w = ContinuousWorkload("count", adapter or CountingAdapter(), ContinuousPolicy(**policy))
        w.start()
        started.append(w)
        return w

    yield make
    for w in started:
        if w.adapter.gate is not None:
            w.adapter.allow(10_000)
        await w.aclose(drain=False)


def admitted_at(w, request_id):
    return [record.index for record in w.steps() if request_id in record.admitted]


@pytest.mark.parametrize("field, value", [("max_active", 0), ("max_batch_tokens", 2), ("max_queue", 0),
                                          ("priority_levels", 17), ("default_timeout_s", -1.0), ("step_log", 1.5)])
def test_policy_is_validated(field, value):
    with pytest.raises(PolicyError, match=f"ContinuousPolicy.{field}"):
        ContinuousPolicy(**{"max_active": 4, field: value})


async def test_every_request_gets_its_own_tokens_with_one_handover_per_step(workload):
    w = workload(max_active=8)
    loop = asyncio.get_running_loop()
    handovers = []
    original = loop.call_soon_threadsafe

    def counting(callback, *args, **kwargs):
        if threading.current_thread().name.startswith("batchplex-steps"):
            handovers.append(len(args[0]))
        return original(callback, *args, **kwargs)

    loop.call_soon_threadsafe = counting
    try:
        prompts = [([1], 5), ([10, 20], 1), ([7], 3), ([100], 8)]
        results = await asyncio.gather(*(w.submit(p, max_new_tokens=n) for p, n in prompts))
    finally:
        del loop.call_soon_threadsafe
    assert results == [list(range(p[-1] + 1, p[-1] + 1 + n)) for p, n in prompts]
    stats = w.statistics()
    assert stats["completed"] == 4 and stats["active"] == 0 and stats["waiting"] == 0
    assert stats["steps"] == 8 and stats["generated_tokens"] == 17
    assert len(handovers) <= stats["steps"] and sum(handovers) == 4  # one call per step, carrying whole steps
    assert sorted(w.adapter.released) == sorted(w.adapter.admitted) and stats["memory"] == {"live": 0}
    assert stats["step_ms"]["p50"] is not None and stats["ttft_ms"]["p99"] is not None


async def test_a_request_joins_the_running_batch_between_two_steps(workload):
    w = workload(adapter=CountingAdapter(gated=True))
    first = asyncio.ensure_future(w.submit([1], max_new_tokens=6, request_id="A"))
    w.adapter.allow(2)
    await wait_until(lambda: len(w.steps()) == 2)  # A decoded twice; the loop now waits inside step 2
    second = asyncio.ensure_future(w.submit([50], max_new_tokens=2, request_id="B"))
    await wait_until(lambda: w.statistics()["waiting"] == 1)
    w.adapter.allow(10)
    assert await first == [2, 3, 4, 5, 6, 7] and await second == [51, 52]
    steps = w.steps()
    assert [record.active for record in steps[:3]] == [("A",)] * 3
    assert admitted_at(w, "B") == [3] and steps[3].active == ("A", "B") and steps[4].finished == ("B",)
    assert steps[5].active == ("A",) and steps[5].finished == ("A",)
    assert [record.tokens for record in steps[:5]] == [1, 1, 1, 2, 2]


async def test_active_cap_and_token_budget_keep_strict_order(workload):
    w = workload(max_active=4, max_batch_tokens=8)
    a = w.submit([1] * 5, max_new_tokens=3, request_id="A")
    b = w.submit([2] * 6, max_new_tokens=1, request_id="B")
    c = w.submit([3], max_new_tokens=1, request_id="C")
    assert await asyncio.gather(a, b, c) == [[2, 3, 4], [3], [4]]
    assert admitted_at(w, "A") == [0] and admitted_at(w, "B") == [1] and admitted_at(w, "C") == [1]
    assert all(record.tokens <= 8 for record in w.steps())

    capped = workload(max_active=2)
    results = await asyncio.gather(*(capped.submit([i], max_new_tokens=2 + i, request_id=f"r{i}") for i in range(3)))
    assert results == [[1, 2], [2, 3, 4], [3, 4, 5, 6]]
    assert max(len(record.active) for record in capped.steps()) == 2
    assert admitted_at(capped, "r2") == [2]  # the step after r0 finished


async def test_higher_priority_joins_first(workload):
    w = workload(adapter=CountingAdapter(gated=True), max_active=1, priority_levels=2)
    busy = asyncio.ensure_future(w.submit([0], max_new_tokens=2, request_id="busy"))
    await wait_until(lambda: w.statistics()["active"] == 1)
    low = asyncio.ensure_future(w.submit([10], max_new_tokens=1, priority=0, request_id="low"))
    high = asyncio.ensure_future(w.submit([20], max_new_tokens=1, priority=1, request_id="high"))
    await wait_until(lambda: w.statistics()["waiting"] == 2)
    w.adapter.allow(10)
    assert await asyncio.gather(busy, low, high) == [[1, 2], [11], [21]]
    assert admitted_at(w, "high") == [2] and admitted_at(w, "low") == [3]


async def test_a_deadline_passing_while_waiting_fails_without_running(workload):
    w = workload(adapter=CountingAdapter(gated=True), max_active=1)
    busy = asyncio.ensure_future(w.submit([0], max_new_tokens=2))
    await wait_until(lambda: w.statistics()["active"] == 1)
    late = asyncio.ensure_future(w.submit([5], timeout=0.02, request_id="late"))
    await asyncio.sleep(0.05)
    w.adapter.allow(10)
    with pytest.raises(DeadlineExceeded, match="never ran"):
        await late
    assert await busy == [1, 2]
    assert admitted_at(w, "late") == [] and len(w.adapter.admitted) == 1
    assert w.statistics()["timeouts"] == 1


async def test_a_deadline_passing_while_active_releases_the_sequence(workload):
    w = workload(adapter=CountingAdapter(gated=True))
    task = asyncio.ensure_future(w.submit([0], max_new_tokens=100, timeout=0.1))
    w.adapter.allow(2)
    await wait_until(lambda: len(w.steps()) == 2)
    await asyncio.sleep(0.12)
    w.adapter.allow(1)  # the running step ends; the sequence leaves before the next one
    with pytest.raises(DeadlineExceeded, match="ran past its timeout") as caught:
        await task
    assert caught.value.partial_output == [1, 2, 3]
    assert w.adapter.released == w.adapter.admitted and w.statistics()["memory"] == {"live": 0}
    assert w.statistics()["timeouts"] == 1 and len(w.steps()) == 3


async def test_cancelling_an_active_request_releases_it_before_the_next_step(workload):
    w = workload(adapter=CountingAdapter(gated=True))
    task = asyncio.ensure_future(w.submit([0], max_new_tokens=100, request_id="gone"))
    other = asyncio.ensure_future(w.submit([10], max_new_tokens=4, request_id="stays"))
    w.adapter.allow(1)
    await wait_until(lambda: len(w.steps()) == 1)
    task.cancel()
    w.adapter.allow(10)
    assert await other == [11, 12, 13, 14]
    assert w.steps()[2].left == ("gone",) and w.steps()[2].active == ("stays",)
    assert sorted(w.adapter.released) == sorted(w.adapter.admitted)
    assert w.statistics()["cancelled"] == 1


async def test_cancelling_a_waiting_request_never_admits_it(workload):
    w = workload(adapter=CountingAdapter(gated=True), max_active=1)
    busy = asyncio.ensure_future(w.submit([0], max_new_tokens=2))
    await wait_until(lambda: w.statistics()["active"] == 1)
    waiting = asyncio.ensure_future(w.submit([5], request_id="never"))
    await wait_until(lambda: w.statistics()["waiting"] == 1)
    waiting.cancel()
    w.adapter.allow(10)
    assert await busy == [1, 2]
    await wait_until(lambda: w.statistics()["cancelled"] == 1)
    assert admitted_at(w, "never") == [] and len(w.adapter.admitted) == 1


async def test_a_stream_yields_each_token_when_its_step_ends(workload):
    w = workload(adapter=CountingAdapter(gated=True))
    stream = w.stream([1], max_new_tokens=3)
    w.adapter.allow(1)
    assert await stream.__anext__() == 2
    assert len(w.steps()) == 1  # the first token came before the second step was allowed
    w.adapter.allow(2)
    assert [token async for token in stream] == [3, 4]


async def test_leaving_a_stream_early_releases_the_sequence(workload):
    w = workload()
    seen = []
    async for token in w.stream([0], max_new_tokens=10_000):
        seen.append(token)
        if len(seen) == 2:
            break
    await wait_until(lambda: w.adapter.released == w.adapter.admitted)
    assert seen == [1, 2] and w.statistics()["cancelled"] == 1


async def test_bad_input_fails_alone_at_submit(workload):
    w = workload(max_batch_tokens=64, priority_levels=2)
    good = [asyncio.ensure_future(w.submit([i], max_new_tokens=2)) for i in range(3)]
    with pytest.raises(InvalidRequestError) as caught:
        await w.submit([])
    assert caught.value.workload == "count" and caught.value.rule == "non-empty list of ints"
    with pytest.raises(InvalidRequestError, match="non-empty"):
        w.stream("text")
    with pytest.raises(RequestTooLargeError) as too_large:
        await w.submit([1] * 65)
    assert too_large.value.rule == "max_batch_tokens" and too_large.value.value == 65
    for bad in ({"priority": 2}, {"timeout": 0}, {"request_id": 7}):
        with pytest.raises(InvalidRequestError):
            await w.submit([1], **bad)
    assert await asyncio.gather(*good) == [[1, 2], [2, 3], [3, 4]]
    assert w.statistics()["rejected_invalid"] == 6


async def test_a_full_queue_refuses_at_once(workload):
    w = workload(adapter=CountingAdapter(gated=True), max_active=1, max_queue=2)
    busy = asyncio.ensure_future(w.submit([0], max_new_tokens=1))
    await wait_until(lambda: w.statistics()["active"] == 1)
    queued = [asyncio.ensure_future(w.submit([i], max_new_tokens=1)) for i in (1, 2)]
    await asyncio.sleep(0)
    with pytest.raises(QueueFullError, match="max_queue=2"):
        await w.submit([3])
    w.adapter.allow(10)
    assert await asyncio.gather(busy, *queued) == [[1], [2], [3]]
    assert w.statistics()["rejected_full"] == 1


async def test_a_failed_step_fails_its_sequences_and_the_loop_goes_on(workload):
    w = workload()
    w.adapter.fail_next_step = True
    with pytest.raises(RequestFailed, match="device fault"):
        await w.submit([1], max_new_tokens=3)
    assert await w.submit([5], max_new_tokens=2) == [6, 7]
    assert w.adapter.released == w.adapter.admitted and w.statistics()["failed"] == 1


async def test_closing_without_draining_fails_waiting_and_releases_active():
    adapter = CountingAdapter(gated=True)
    w = ContinuousWorkload("count", adapter, ContinuousPolicy(max_active=1))
    w.start()
    active = asyncio.ensure_future(w.submit([0], max_new_tokens=100))
    await wait_until(lambda: w.statistics()["active"] == 1)
    waiting = asyncio.ensure_future(w.submit([5]))
    await asyncio.sleep(0)
    closing = asyncio.ensure_future(w.aclose(drain=False))
    with pytest.raises(SchedulerClosed, match="before this request ran"):
        await waiting
    adapter.allow(10)
    await closing
    with pytest.raises(SchedulerClosed, match="left the batch"):
        await active
    assert adapter.released == adapter.admitted and adapter.closed
    with pytest.raises(SchedulerClosed):
        await w.submit([1])


async def test_closing_with_draining_finishes_everything():
    w = ContinuousWorkload("count", CountingAdapter(), ContinuousPolicy(max_active=2))
    w.start()
    tasks = [asyncio.ensure_future(w.submit([i], max_new_tokens=3)) for i in range(5)]
    await asyncio.sleep(0)
    await w.aclose()
    assert [task.result() for task in tasks] == [[i + 1, i + 2, i + 3] for i in range(5)]


async def test_an_adapter_that_cannot_start_fails_at_start():
    w = ContinuousWorkload("count", CountingAdapter(fail_start=True))
    with pytest.raises(RuntimeError, match="no model"):
        w.start()
    with pytest.raises(SchedulerClosed):
        await w.submit([1])
