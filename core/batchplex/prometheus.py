"""Prometheus metrics for a scheduler (optional: needs ``prometheus-client``).

`PrometheusExporter` is a plugin: registered on a scheduler, its ``batch_finished`` hook feeds per-workload
histograms and counters as batches finish, and a collector reads the scheduler's queues and request counters when
Prometheus scrapes. It writes into its own ``CollectorRegistry`` unless given one::

    exporter = PrometheusExporter(scheduler)
    scheduler.register_plugin(exporter)
    exporter.serve(9464)            # http://127.0.0.1:9464/metrics

Every series carries a ``workload`` label (batch series also ``device``), except the device's busy time:

* ``batchplex_batch_size`` (histogram): requests per batch;
* ``batchplex_queue_wait_seconds`` (histogram): per batch, the queue wait of its oldest request (arrival to
  dispatch), the longest wait in the batch;
* ``batchplex_batch_run_seconds`` (histogram): device time of the batch (model and postprocess);
* ``batchplex_batch_pipeline_seconds`` (histogram): host time of the batch from dispatch until its results reach
  the event loop (its whole trip through the executor's stages);
* ``batchplex_batches_total``, ``batchplex_batches_retried_total`` (split after a failure or out-of-memory);
* ``batchplex_cost_total`` and ``batchplex_padded_cost_total``: real and padded cost (tokens, rows); padding
  waste over a window is ``1 - rate(cost) / rate(padded_cost)``;
* ``batchplex_device_busy_seconds_total{device}``: the device time of model work, the union of the batches'
  spans (`BusyTracker`), so overlapping batches of workloads with executors of their own count once; the
  device's busy fraction over a window is ``rate(batchplex_device_busy_seconds_total[1m])``;
* ``batchplex_requests_total{outcome=completed|failed|timeout|cancelled|rejected_invalid|rejected_full}``;
* gauges ``batchplex_queue_depth``, ``batchplex_in_flight``, ``batchplex_batch_size_limit`` and
  ``batchplex_max_wait_seconds`` (the live knobs, moved by online tuning and out-of-memory), and
  ``batchplex_padding_waste_ratio`` (since start).

The collector runs on the scraping thread, so it reads plain counters of each workload (read-only, O(1)) rather
than calling ``Scheduler.statistics()``, which computes percentiles and folds cancellation counts on the
scheduler's own thread.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from .hookspecs import hookimpl
from .metrics import BatchRecord, BusyTracker

__all__ = ["PrometheusExporter", "SIZE_BUCKETS", "SECONDS_BUCKETS"]

SIZE_BUCKETS = tuple(float(1 << k) for k in range(13))  # 1 .. 4096
SECONDS_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
OUTCOMES = ("completed", "failed", "timeout", "cancelled", "rejected_invalid", "rejected_full")


def _client() -> Any:
    try:
        import prometheus_client
        import prometheus_client.core
    except ImportError as exc:
        raise ImportError("batchplex.prometheus needs the prometheus-client package: "
                          "pip install prometheus-client") from exc
    return prometheus_client


class PrometheusExporter:
    """Per-workload Prometheus metrics for ``scheduler`` (queue gauges and request counters need it; without it
    only the batch metrics are kept). Register it with ``scheduler.register_plugin``."""

    def __init__(self, scheduler: Any = None, *, registry: Any = None, namespace: str = "batchplex") -> None:
        client = _client()
        self.registry = client.CollectorRegistry() if registry is None else registry
        labels = ("workload", "device")
        common = {"namespace": namespace, "labelnames": labels, "registry": self.registry}
        self.batch_size = client.Histogram("batch_size", "Requests per batch.", buckets=SIZE_BUCKETS, **common)
        self.queue_wait = client.Histogram(
            "queue_wait_seconds", "Queue wait of each batch's oldest request, from arrival to dispatch.",
            buckets=SECONDS_BUCKETS, **common)
        self.batch_run = client.Histogram("batch_run_seconds", "Device time of each batch (model and postprocess).",
                                          buckets=SECONDS_BUCKETS, **common)
        self.batch_pipeline = client.Histogram(
            "batch_pipeline_seconds", "Host time of each batch from dispatch to its results reaching the event loop.",
            buckets=SECONDS_BUCKETS, **common)
        self.batches = client.Counter("batches", "Finished batches.", **common)
        self.retried = client.Counter("batches_retried", "Batches split and retried after a failure or "
                                      "out-of-memory.", **common)
        self.cost = client.Counter("cost", "Cost computed for real requests (tokens, rows), padding excluded.",
                                   **common)
        self.padded_cost = client.Counter("padded_cost", "Cost computed, padding included.", **common)
        self.device_busy = client.Counter(
            "device_busy_seconds", "Device time of model work: the union of the batches' spans on the device.",
            namespace=namespace, labelnames=("device",), registry=self.registry)
        self._busy: dict[str, BusyTracker] = {}
        if scheduler is not None:
            self.registry.register(_SchedulerCollector(scheduler, namespace, client))

    @hookimpl
    def batch_finished(self, record: BatchRecord) -> None:
        labels = (record.workload, record.device)
        self.batch_size.labels(*labels).observe(record.size)
        self.queue_wait.labels(*labels).observe(record.max_wait_s)
        self.batch_run.labels(*labels).observe(record.run_s)
        self.batch_pipeline.labels(*labels).observe(record.pipeline_s)
        self.batches.labels(*labels).inc()
        self.retried.labels(*labels).inc(int(record.retried))  # 0 still creates the series
        self.cost.labels(*labels).inc(record.cost)
        self.padded_cost.labels(*labels).inc(record.padded_cost)
        if record.device_start_s is not None:
            busy = self._busy.setdefault(record.device, BusyTracker())
            self.device_busy.labels(record.device).inc(busy.add(record.device_start_s, record.device_end_s))

    def serve(self, port: int, addr: str = "127.0.0.1") -> Any:
        """Serve ``/metrics`` on ``addr:port`` from a daemon thread; returns what
        ``prometheus_client.start_http_server`` returns (the server and its thread on recent versions)."""
        return _client().start_http_server(port, addr=addr, registry=self.registry)

    def render(self) -> bytes:
        """The metrics in the Prometheus text format, as a scrape would return them."""
        return _client().generate_latest(self.registry)


class _SchedulerCollector:
    """Reads queue depths, live knobs and request counters of every workload when the registry is collected."""

    def __init__(self, scheduler: Any, namespace: str, client: Any) -> None:
        self.scheduler = scheduler
        self.namespace = namespace
        self.core = client.core

    def describe(self) -> list[Any]:
        return []  # the workloads are only known at collection time

    def collect(self) -> Iterator[Any]:
        core, ns = self.core, self.namespace
        gauges = {
            "queue_depth": core.GaugeMetricFamily(f"{ns}_queue_depth", "Requests waiting in the queue.",
                                                  labels=["workload"]),
            "in_flight": core.GaugeMetricFamily(f"{ns}_in_flight", "Requests taken into batches not yet finished.",
                                                labels=["workload"]),
            "limit": core.GaugeMetricFamily(f"{ns}_batch_size_limit", "Most requests the next batch may hold now.",
                                            labels=["workload"]),
            "wait": core.GaugeMetricFamily(f"{ns}_max_wait_seconds", "Longest a request waits for its batch now.",
                                           labels=["workload"]),
            "waste": core.GaugeMetricFamily(f"{ns}_padding_waste_ratio", "Share of computed cost that was "
                                            "padding, since start.", labels=["workload"]),
        }
        requests = core.CounterMetricFamily(f"{ns}_requests", "Requests by outcome.", labels=["workload", "outcome"])
        for name, workload in self.scheduler.workloads.items():
            stats, queue = workload.stats, workload.queue
            cancelled = stats.cancelled + queue.cancelled_seen
            counts = (stats.completed, stats.failed, stats.timeouts, cancelled, stats.rejected_invalid,
                      stats.rejected_full)
            for outcome, count in zip(OUTCOMES, counts):
                requests.add_metric([name, outcome], count)
            in_flight = stats.submitted - stats.completed - stats.failed - stats.timeouts - cancelled - queue.depth
            gauges["queue_depth"].add_metric([name], queue.depth)
            gauges["in_flight"].add_metric([name], max(0, in_flight))
            gauges["limit"].add_metric([name], queue.batch_limit)
            gauges["wait"].add_metric([name], queue.max_wait_s)
            gauges["waste"].add_metric([name], 1 - stats.cost / stats.padded_cost if stats.padded_cost else 0.0)
        yield from gauges.values()
        yield requests
