"""Batch formation rules, driven by a fake clock (``now`` is passed explicitly; nothing sleeps)."""

from concurrent.futures import Future

import pytest

from batchplex import BatchPolicy, QueueFullError
from batchplex._batching import Request, RequestQueue

MS = 0.001


def make(queue: RequestQueue, now: float, cost: int = 1, priority: int = 0, timeout: float | None = None,
         label: object = None) -> Request:
    request = Request(label, cost, now, None if timeout is None else now + timeout, priority, Future())
    queue.push(request)
    return request


def labels(batch):
    return [request.item for request in batch]


def test_a_full_batch_goes_at_once():
    queue = RequestQueue(BatchPolicy(max_batch_size=4, max_wait_ms=10))
    full = [queue.push(Request(i, 1, 0.0, None, 0, Future())) for i in range(4)]
    assert full == [False, False, False, True]
    assert queue.ready(0.0)
    assert labels(queue.take(0.0)) == [0, 1, 2, 3]
    assert queue.depth == 0


def test_wait_is_counted_from_the_oldest_request():
    queue = RequestQueue(BatchPolicy(max_batch_size=8, max_wait_ms=10))
    make(queue, 0.0, label="old")
    make(queue, 9 * MS, label="new")
    assert queue.next_event() == pytest.approx(10 * MS)  # the oldest arrival + max_wait, not the newest
    assert not queue.ready(9.9 * MS)
    assert queue.take(9.9 * MS) == []
    assert queue.ready(10 * MS)
    assert labels(queue.take(10 * MS)) == ["old", "new"]
    assert queue.next_event() is None


def test_fifo_order_and_size_limit_when_more_requests_wait():
    queue = RequestQueue(BatchPolicy(max_batch_size=3, max_wait_ms=1))
    for i in range(7):
        make(queue, i * 0.1 * MS, label=i)
    assert labels(queue.take(5 * MS)) == [0, 1, 2]
    assert labels(queue.take(5 * MS)) == [3, 4, 5]
    assert labels(queue.take(5 * MS)) == [6]


def test_force_takes_a_batch_before_the_wait_ends():
    queue = RequestQueue(BatchPolicy(max_batch_size=8, max_wait_ms=100))
    make(queue, 0.0, label="a")
    assert queue.take(0.0) == []
    assert labels(queue.take(0.0, force=True)) == ["a"]


def test_buckets_keep_lengths_apart_and_each_has_its_own_timer():
    queue = RequestQueue(BatchPolicy(max_batch_size=8, max_wait_ms=10, bucket_edges=(32, 128)))
    make(queue, 0.0, cost=10, label="short-1")
    make(queue, 2 * MS, cost=100, label="long-1")
    make(queue, 3 * MS, cost=30, label="short-2")
    assert queue.next_event() == pytest.approx(10 * MS)
    assert labels(queue.take(10 * MS)) == ["short-1", "short-2"]
    assert queue.take(10 * MS) == []  # the long bucket's oldest arrived at 2 ms: due at 12 ms
    assert labels(queue.take(12 * MS)) == ["long-1"]


def test_the_readiest_bucket_is_the_one_with_the_oldest_request():
    queue = RequestQueue(BatchPolicy(max_batch_size=8, max_wait_ms=1, bucket_edges=(32, 128)))
    make(queue, 1 * MS, cost=10, label="short")
    make(queue, 0.0, cost=100, label="long")
    assert labels(queue.take(5 * MS)) == ["long"]
    assert labels(queue.take(5 * MS)) == ["short"]


def test_cost_budget_bounds_padded_cost():
    # padded cost = batch size x largest cost; budget 256 fits 4 x 64 but not 5 x 64
    queue = RequestQueue(BatchPolicy(max_batch_size=32, max_wait_ms=1, max_batch_cost=256))
    for i in range(6):
        make(queue, 0.0, cost=64 if i == 0 else 10, label=i)
    assert labels(queue.take(1 * MS)) == [0, 1, 2, 3]
    assert labels(queue.take(1 * MS)) == [4, 5]


def test_a_spent_budget_makes_the_bucket_full():
    queue = RequestQueue(BatchPolicy(max_batch_size=32, max_wait_ms=50, max_batch_cost=100))
    assert not queue.push(Request("a", 40, 0.0, None, 0, Future()))
    assert not queue.push(Request("b", 40, 0.0, None, 0, Future()))
    assert queue.push(Request("c", 40, 0.0, None, 0, Future()))  # 3 x 40 >= 100: go now
    assert labels(queue.take(0.0)) == ["a", "b"]


def test_budget_counts_padding_up_to_preferred_sizes():
    queue = RequestQueue(BatchPolicy(max_batch_size=8, max_wait_ms=1, preferred_batch_sizes=(4, 8),
                                     max_batch_cost=40))
    for i in range(5):
        make(queue, 0.0, cost=10, label=i)
    # 4 requests pad to 4 (cost 40); a fifth would pad to 8 (cost 80 > 40)
    assert labels(queue.take(1 * MS)) == [0, 1, 2, 3]


def test_higher_priority_goes_first():
    queue = RequestQueue(BatchPolicy(max_batch_size=2, max_wait_ms=1, priority_levels=3))
    make(queue, 0.0, priority=0, label="low")
    make(queue, 0.1 * MS, priority=2, label="high")
    make(queue, 0.2 * MS, priority=1, label="mid")
    assert labels(queue.take(1 * MS)) == ["high", "mid"]
    assert labels(queue.take(1 * MS)) == ["low"]


def test_low_priority_does_not_starve():
    queue = RequestQueue(BatchPolicy(max_batch_size=1, max_wait_ms=1, priority_levels=2, priority_aging_ms=50))
    make(queue, 0.0, priority=0, label="low")
    served = []
    for step in range(100):
        now = step * MS
        make(queue, now, priority=1, label=f"high-{step}")
        served += labels(queue.take(now + MS))
    assert "low" in served
    assert served.index("low") <= 51  # served once it waited 50 ms, despite a steady stream of high priority


def test_expired_requests_are_removed_and_never_taken():
    queue = RequestQueue(BatchPolicy(max_batch_size=8, max_wait_ms=100))
    make(queue, 0.0, timeout=5 * MS, label="short-deadline")
    keep = make(queue, 0.0, label="no-deadline")
    assert queue.tightest_deadline() == pytest.approx(5 * MS)
    assert queue.expire(4 * MS) == []
    expired = queue.expire(5 * MS)
    assert labels(expired) == ["short-deadline"]
    assert queue.depth == 1
    assert queue.take(0.0, force=True) == [keep]


def test_the_batcher_never_waits_past_the_tightest_deadline():
    queue = RequestQueue(BatchPolicy(max_batch_size=8, max_wait_ms=100))
    queue.deadline_margin_s = 2 * MS  # a batch takes ~2 ms to run
    make(queue, 0.0, label="patient")
    make(queue, 1 * MS, timeout=10 * MS, label="urgent")
    assert queue.next_event() == pytest.approx(9 * MS)  # deadline 11 ms minus the 2 ms run time
    assert not queue.ready(8.9 * MS)
    assert labels(queue.take(9 * MS)) == ["patient", "urgent"]


def test_cancelled_requests_are_dropped_before_they_run():
    queue = RequestQueue(BatchPolicy(max_batch_size=8, max_wait_ms=1))
    gone = make(queue, 0.0, label="gone")
    make(queue, 0.0, label="stays")
    gone.waiter.cancel()
    assert labels(queue.take(1 * MS)) == ["stays"]
    assert queue.cancelled_seen == 1
    assert queue.depth == 0


def test_a_full_queue_refuses_at_once_and_names_the_bound():
    queue = RequestQueue(BatchPolicy(max_queue=2), workload="w")
    make(queue, 0.0)
    make(queue, 0.0)
    with pytest.raises(QueueFullError, match=r"'w'.*max_queue=2"):
        make(queue, 0.0)


def test_cancelled_requests_stop_counting_against_the_bound():
    queue = RequestQueue(BatchPolicy(max_queue=2))
    first = make(queue, 0.0)
    make(queue, 0.0)
    first.waiter.cancel()
    make(queue, 0.0)  # room again: the cancelled one was compacted away
    assert queue.depth == 2


def test_lowered_batch_limit_applies_to_the_next_batches():
    queue = RequestQueue(BatchPolicy(max_batch_size=8, max_wait_ms=1))
    for i in range(8):
        make(queue, 0.0, label=i)
    queue.memory_cap = 3
    assert labels(queue.take(1 * MS)) == [0, 1, 2]
    queue.max_batch_size, queue.memory_cap = 2, 8  # a tuner's target below the cap wins too
    assert labels(queue.take(1 * MS)) == [3, 4]


def test_a_tuned_wait_replaces_the_policy_wait():
    queue = RequestQueue(BatchPolicy(max_batch_size=8, max_wait_ms=10))
    queue.max_wait_s = 2 * MS
    make(queue, 0.0)
    assert queue.next_event() == pytest.approx(2 * MS)
    assert queue.ready(2 * MS)


def test_drain_returns_every_live_request():
    queue = RequestQueue(BatchPolicy(priority_levels=2, bucket_edges=(4, 8)))
    made = [make(queue, 0.0, cost=c, priority=p) for c in (1, 6) for p in (0, 1)]
    made[0].waiter.cancel()
    assert sorted(map(id, queue.drain())) == sorted(map(id, made[1:]))
    assert queue.depth == 0
