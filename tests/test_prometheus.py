"""The Prometheus exporter: metrics rendered after real requests ran through a Scheduler (completed, padded,
timed out, refused when full, invalid) and parsed back from the text format; the HTTP endpoint."""

import asyncio
import sys
import threading
import urllib.request

import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from batchplex import BatchPolicy, DeadlineExceeded, InvalidRequestError, QueueFullError, Scheduler
from batchplex.prometheus import PrometheusExporter


def samples(text):
    """{(sample name, frozenset of labels): value} from the Prometheus text format."""
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(parsed, name, **labels):
    return parsed[(name, frozenset(labels.items()))]


async def test_metrics_follow_real_requests_through_a_scheduler():
    release, entered = threading.Event(), threading.Event()

    def model(batch):  # the first batch holds the device until the test releases it
        entered.set()
        assert release.wait(10)
        return batch.sum(dim=1, keepdim=True)

    async with Scheduler(autoload=False, pipeline_depth=1) as scheduler:
        scheduler.add_workload("lin", adapter="tensor", adapter_options={"shape": (4,)}, model=model,
                               policy=BatchPolicy(max_batch_size=4, max_wait_ms=1, preferred_batch_sizes=(4,),
                                                  max_queue=6))
        exporter = PrometheusExporter(scheduler)
        scheduler.register_plugin(exporter)
        first = [asyncio.ensure_future(scheduler.submit("lin", torch.ones(4))) for _ in range(4)]
        await asyncio.to_thread(entered.wait, 10)
        late = [asyncio.ensure_future(scheduler.submit("lin", torch.ones(4), timeout=0.02)) for _ in range(2)]
        for outcome in await asyncio.gather(*late, return_exceptions=True):
            assert isinstance(outcome, DeadlineExceeded)
        queued = [asyncio.ensure_future(scheduler.submit("lin", torch.ones(4))) for _ in range(6)]
        await asyncio.sleep(0)
        with pytest.raises(QueueFullError):
            await scheduler.submit("lin", torch.ones(4))
        with pytest.raises(InvalidRequestError):
            await scheduler.submit("lin", torch.ones(5))
        during = samples(exporter.render().decode())
        assert value(during, "batchplex_queue_depth", workload="lin") == 6
        assert value(during, "batchplex_in_flight", workload="lin") == 4
        release.set()
        results = await asyncio.gather(*first, *queued)
        assert all(torch.equal(r, torch.tensor([4.0])) for r in results)
        stats = scheduler.statistics()["lin"]

    parsed = samples(exporter.render().decode())
    for outcome, expected in (("completed", 10), ("failed", 0), ("timeout", 2), ("cancelled", 0),
                              ("rejected_invalid", 1), ("rejected_full", 1)):
        assert value(parsed, "batchplex_requests_total", workload="lin", outcome=outcome) == expected, outcome
    batch = {"workload": "lin", "device": "cpu"}
    assert value(parsed, "batchplex_batches_total", **batch) == 3  # 4, 4 and 2 requests
    assert value(parsed, "batchplex_batch_size_count", **batch) == 3
    assert value(parsed, "batchplex_batch_size_sum", **batch) == 10
    assert value(parsed, "batchplex_batch_size_bucket", le="2.0", **batch) == 1
    assert value(parsed, "batchplex_cost_total", **batch) == 10
    assert value(parsed, "batchplex_padded_cost_total", **batch) == 12  # the batch of 2 padded to 4 rows
    assert value(parsed, "batchplex_padding_waste_ratio", workload="lin") == pytest.approx(stats["padding_waste"])
    assert value(parsed, "batchplex_padding_waste_ratio", workload="lin") == pytest.approx(1 - 10 / 12)
    assert value(parsed, "batchplex_batch_run_seconds_count", **batch) == 3
    assert value(parsed, "batchplex_batch_run_seconds_sum", **batch) >= 0.02  # the held batch ran >= 20 ms
    assert value(parsed, "batchplex_batch_pipeline_seconds_count", **batch) == 3
    # a batch's trip through the executor includes its run
    assert value(parsed, "batchplex_batch_pipeline_seconds_sum", **batch) >= \
        value(parsed, "batchplex_batch_run_seconds_sum", **batch)
    assert value(parsed, "batchplex_queue_wait_seconds_count", **batch) == 3
    assert value(parsed, "batchplex_queue_wait_seconds_bucket", le="+Inf", **batch) == 3
    assert value(parsed, "batchplex_batches_retried_total", **batch) == 0
    # one executor on the CPU runs one batch at a time, so the union of the spans is their summed run time
    assert value(parsed, "batchplex_device_busy_seconds_total", device="cpu") == pytest.approx(
        value(parsed, "batchplex_batch_run_seconds_sum", **batch))
    assert value(parsed, "batchplex_queue_depth", workload="lin") == 0
    assert value(parsed, "batchplex_in_flight", workload="lin") == 0
    assert value(parsed, "batchplex_batch_size_limit", workload="lin") == 4
    assert value(parsed, "batchplex_max_wait_seconds", workload="lin") == pytest.approx(0.001)


async def test_the_endpoint_serves_the_exporters_own_registry():
    async with Scheduler(autoload=False) as scheduler:
        scheduler.add_workload("lin", adapter="tensor", model=lambda batch: batch)
        exporter = PrometheusExporter(scheduler)
        scheduler.register_plugin(exporter)
        await asyncio.gather(*(scheduler.submit("lin", torch.zeros(2)) for _ in range(5)))
        server, thread = exporter.serve(0)
        try:
            url = f"http://127.0.0.1:{server.server_port}/metrics"
            body = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=5).read().decode())
        finally:
            server.shutdown()
            server.server_close()
            thread.join(5)
    parsed = samples(body)
    assert value(parsed, "batchplex_requests_total", workload="lin", outcome="completed") == 5
    assert "python_gc_objects_collected_total" not in body  # its own registry, not the global default one


def test_a_missing_prometheus_client_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "prometheus_client", None)
    with pytest.raises(ImportError, match="pip install prometheus-client"):
        PrometheusExporter()
