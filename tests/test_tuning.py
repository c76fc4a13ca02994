"""Batch-size profiling: the sweep on real collated inputs, the sweet spot under a budget, out-of-memory, the
written JSON/CSV/PNG and the ``batchplex profile`` command."""

import csv
import json
import time

import matplotlib.image
import pytest
import torch

from batchplex import BatchPolicy, cli
from batchplex.builtin_adapters import TensorAdapter
from batchplex.tuning import ProfilePoint, batch_sizes, policy_source, profile, suggest_policy, sweet_spot

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class SlowLinear(torch.nn.Module):
    """A tiny linear model that also sleeps 0.4 ms + 0.1 ms per row, so latency grows clearly with batch size."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.linear = torch.nn.Linear(8, 4)

    def forward(self, batch):
        time.sleep(0.0004 + 0.0001 * batch.shape[0])
        return self.linear(batch)


class OutOfMemoryAbove(torch.nn.Module):
    """Runs batches up to ``limit`` rows and raises the real out-of-memory exception type above it.

    Each run sleeps 2 ms whatever its size, so the largest batch that fits is clearly the fastest per item: on a GPU
    ``batch * 2`` alone takes microseconds, and noise could rank batch 4 above batch 8."""

    def __init__(self, limit):
        super().__init__()
        self.limit = limit
        self.largest_run = 0

    def forward(self, batch):
        if batch.shape[0] > self.limit:
            raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate a batch of {batch.shape[0]}")
        self.largest_run = max(self.largest_run, batch.shape[0])
        time.sleep(0.002)
        return batch * 2


def tensor_adapter():
    return TensorAdapter().configure(shape=(8,), dtype=torch.float32)


def make_request(rng):
    return torch.tensor([rng.uniform(-1, 1) for _ in range(8)])


def test_profile_picks_the_best_throughput_within_the_budget_and_writes_a_png(device, tmp_path):
    budget_ms = 2.5
    result = profile("slow-linear", tensor_adapter(), SlowLinear().to(device), make_request, device,
                     budget_ms=budget_ms, max_batch=64, repeats=3, warmup=1, progress=False)
    sizes = [p.batch_size for p in result.points]
    assert sizes == [1, 2, 4, 8, 16, 32, 64] and result.oom_at is None
    sweet = result.sweet_spot
    assert sweet is not None and sweet.latency_ms <= budget_ms  # on the measured numbers
    assert not [p for p in result.points if p.latency_ms <= budget_ms and p.items_per_s > sweet.items_per_s]
    assert not [p for p in result.points if p.batch_size > sweet.batch_size and p.latency_ms <= budget_ms
                and p.items_per_s >= sweet.items_per_s]
    assert any(p.latency_ms > budget_ms for p in result.points)  # the budget really cut the sweep
    for p in result.points:
        assert p.latency_ms == pytest.approx(p.batch_size / p.items_per_s * 1000)
        assert p.latency_min_ms <= p.latency_ms <= p.latency_max_ms and p.run_ms >= 0.4
    assert result.policy.max_batch_size == sweet.batch_size

    json_path, csv_path, png_path = result.write(tmp_path / "profile-slow-linear")
    assert png_path.read_bytes()[:8] == PNG_SIGNATURE
    image = matplotlib.image.imread(png_path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    report = json.loads(json_path.read_text())
    assert report["sweet_spot"]["batch_size"] == sweet.batch_size
    assert report["policy"] == policy_source(result.policy) and report["latency_budget_ms"] == budget_ms
    with csv_path.open() as rows:
        table = list(csv.DictReader(rows))
    assert [int(row["batch_size"]) for row in table] == sizes
    assert float(table[0]["items_per_s"]) == pytest.approx(result.points[0].items_per_s)


def test_the_sweep_stops_cleanly_at_out_of_memory_and_reports_where(device):
    model = OutOfMemoryAbove(limit=8)
    result = profile("oom", tensor_adapter(), model, make_request, device, budget_ms=1000.0, max_batch=64,
                     repeats=2, warmup=1, progress=False)
    assert result.oom_at == 16
    assert [p.batch_size for p in result.points] == [1, 2, 4, 8] and model.largest_run == 8
    assert result.sweet_spot.batch_size == 8


def test_a_model_error_that_is_not_out_of_memory_propagates(device):
    def broken(batch):
        raise ValueError("broken model")

    with pytest.raises(ValueError, match="broken model"):
        profile("broken", tensor_adapter(), broken, make_request, device, budget_ms=10.0, max_batch=4,
                repeats=1, warmup=0, progress=False)


def test_sizes_are_powers_of_two_plus_preferred_and_extra_sizes():
    assert batch_sizes(100, preferred=(24,), extra=(3, 200)) == [1, 2, 3, 4, 8, 16, 24, 32, 64]
    assert batch_sizes(1) == [1]
    with pytest.raises(ValueError):
        batch_sizes(0)


def point(n, ms):
    return ProfilePoint(n, 0.0, ms, 0.0, ms, ms, ms, 1)


def test_sweet_spot_and_the_suggested_policy():
    points = [point(1, 1.0), point(8, 2.0), point(16, 3.0), point(24, 7.5), point(32, 9.0)]
    assert sweet_spot(points, 8.0).batch_size == 16  # 24 fits too, but gives less throughput
    assert sweet_spot(points, 0.5) is None
    base = BatchPolicy(max_batch_size=64, max_wait_ms=5, preferred_batch_sizes=(8, 16, 64), max_queue=100)
    policy = suggest_policy(base, points[2])
    assert policy.max_batch_size == 16 and policy.max_wait_ms == 3.0 and policy.preferred_batch_sizes == (8, 16)
    assert policy.priority_aging_ms == max(100.0, 20 * 3.0) and policy.max_queue == 100
    assert eval(policy_source(policy), {"BatchPolicy": BatchPolicy}) == policy
    assert suggest_policy(base, points[2], max_wait_ms=2.0).max_wait_ms == 2.0


def test_profile_command_on_a_bundled_example(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("BATCHPLEX_DISABLE_PLUGIN_AUTOLOAD", "1")
    stem = tmp_path / "mlp"
    code = cli.main(["profile", "mlp", "--device", "cpu", "--max-batch", "8", "--repeats", "2", "--warmup", "1",
                     "--latency-budget-ms", "1000", "--out", str(stem), "--no-progress"])
    out = capsys.readouterr().out
    assert code == 0
    report = json.loads(stem.with_suffix(".json").read_text())
    chosen = report["sweet_spot"]["batch_size"]
    assert f"sweet spot: batch size {chosen}," in out and f"BatchPolicy(max_batch_size={chosen}, max_wait_ms=" in out
    assert report["workload"] == "mlp" and report["command"].startswith("batchplex profile mlp")
    assert stem.with_suffix(".png").read_bytes()[:8] == PNG_SIGNATURE


MODEL_MODULE = '''
import torch

def build():
    torch.manual_seed(0)
    return torch.nn.Linear(8, 2).double()

def make_request(rng):
    return torch.tensor([rng.random() for _ in range(8)], dtype=torch.float64)
'''


def test_profile_command_with_a_model_given_by_import_path(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("BATCHPLEX_DISABLE_PLUGIN_AUTOLOAD", "1")
    (tmp_path / "tiny_profiled_model.py").write_text(MODEL_MODULE)
    monkeypatch.chdir(tmp_path)
    code = cli.main(["profile", "--adapter", "tensor", "--adapter-option", "shape=(8,)",
                     "--adapter-option", "dtype=torch.float64", "--model", "tiny_profiled_model:build",
                     "--requests", "tiny_profiled_model:make_request", "--max-batch", "4", "--repeats", "1",
                     "--warmup", "0", "--no-progress", "--latency-budget-ms", "1e-6"])
    out = capsys.readouterr().out
    assert code == 1 and "no measured batch size runs within" in out  # an impossible budget says so
    report = json.loads((tmp_path / "profile-build-cpu.json").read_text())
    assert [p["batch_size"] for p in report["points"]] == [1, 2, 4] and report["sweet_spot"] is None
