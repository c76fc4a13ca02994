"""The device clock that places batches on a CUDA device's timeline, driven by stand-in events on the CPU: spans
stay precise for hours although CUDA reports float32 milliseconds, and no batch is read against an anchor it
might precede."""

import struct
import threading

import pytest
import torch

from batchplex._device_clock import _KEPT_ANCHORS, DeviceClock


def float32(value: float) -> float:
    return struct.unpack("f", struct.pack("f", value))[0]


class Timeline:
    """The device's clock in float64 seconds; an event recorded now completes ``lag`` seconds later."""

    def __init__(self):
        self.t = 0.0
        self.lag = 0.0


class StandInEvent:
    """Like ``torch.cuda.Event(enable_timing=True)``: ``elapsed_time`` answers in float32 milliseconds."""

    def __init__(self, timeline):
        self.timeline = timeline
        self.at = None

    def record(self, stream=None):
        self.at = self.timeline.t + self.timeline.lag

    def synchronize(self):
        self.timeline.t = max(self.timeline.t, self.at)

    def query(self):
        return self.timeline.t >= self.at

    def elapsed_time(self, other):
        assert self.query() and other.query(), "CUDA refuses to time events that have not completed"
        return float32((other.at - self.at) * 1e3)


def clock_on(timeline, every_s=30.0):
    return DeviceClock(torch.device("cuda", 0), every_s, new_event=lambda: StandInEvent(timeline),
                       stream=lambda: None, now=lambda: timeline.t)


def batch_event(timeline, clock, at):
    """A batch's start event: its generation is taken before it is recorded, as the run stage does."""
    generation = clock.generation()
    timeline.t = at
    event = StandInEvent(timeline)
    event.record()
    return generation, event


def test_spans_stay_precise_after_hours_of_running():
    timeline = Timeline()
    clock = clock_on(timeline)
    zero = StandInEvent(timeline)
    zero.record()
    for second in range(2 * 3600):  # two hours of batches, one a second
        timeline.t = float(second)
        clock.generation()
    generation, event = batch_event(timeline, clock, 7200.0012345)
    assert clock.seconds(generation, event) == pytest.approx(7200.0012345, abs=2e-5)
    # read against one zero instead, float32 milliseconds two hours on are 0.5 ms apart
    assert abs(zero.elapsed_time(event) / 1e3 - 7200.0012345) > 2e-4


def test_a_batch_is_read_against_the_anchor_current_when_it_started():
    timeline = Timeline()
    clock = clock_on(timeline, every_s=10.0)
    generation, event = batch_event(timeline, clock, 5.0)
    timeline.t = 12.0
    clock.generation()  # records a new anchor at 12 s
    timeline.t = 13.0
    assert clock.generation() == generation + 1  # the anchor completed: later batches read against it
    assert clock.seconds(generation, event) == pytest.approx(5.0)  # the earlier batch still reads its own
    later_generation, later = batch_event(timeline, clock, 14.5)
    assert clock.seconds(later_generation, later) == pytest.approx(14.5)


def test_an_anchor_is_used_only_once_it_has_completed():
    timeline = Timeline()
    clock = clock_on(timeline, every_s=1.0)
    timeline.t, timeline.lag = 2.0, 0.5  # the device is behind: the new anchor completes at 2.5 s
    generation = clock.generation()
    timeline.lag = 0.0
    assert clock.generation() == generation  # not yet complete at 2.0 s
    timeline.t = 2.6
    assert clock.generation() == generation + 1


def test_anchors_too_old_are_dropped():
    timeline = Timeline()
    clock = clock_on(timeline, every_s=1.0)
    generation, event = batch_event(timeline, clock, 0.5)
    for second in range(1, 3 * _KEPT_ANCHORS):
        timeline.t = float(second)
        clock.generation()
    with pytest.raises(KeyError):
        clock.seconds(generation, event)


def test_a_refused_anchor_keeps_the_current_one():
    timeline = Timeline()
    clock = clock_on(timeline, every_s=1.0)

    class Refused(StandInEvent):
        def record(self, stream=None):
            raise RuntimeError("CUDA error: the event could not be recorded")

    clock._new_event = lambda: Refused(timeline)
    timeline.t = 2.0
    assert clock.generation() == 0  # no exception: spans go on being read against the first anchor
    generation, event = batch_event(timeline, clock, 2.5)
    assert clock.seconds(generation, event) == pytest.approx(2.5)


def test_executor_threads_may_share_the_clock():
    """Run stages and finish stages of several executors call it at once: every read is the event's own time."""
    timeline = Timeline()
    clock = clock_on(timeline, every_s=0.05)
    advance = threading.Lock()
    errors, reads = [], []

    def executor_thread():
        for _ in range(2000):
            generation = clock.generation()
            with advance:
                timeline.t += 0.001
                event = StandInEvent(timeline)
                event.record()
            try:
                reads.append((clock.seconds(generation, event), event.at))
            except KeyError:  # read after its anchor was dropped: the executor leaves that span unset
                pass
            except Exception as error:  # noqa: BLE001 - the test reports any other failure below
                errors.append(error)

    threads = [threading.Thread(target=executor_thread) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and len(reads) > 7000 and clock.generation() > 100
    assert max(abs(read - at) for read, at in reads) < 1e-5
