"""The plugin as installed: its entry point is found by a plain `Scheduler()`, its adapters are registered under
the plugin's name, it can be blocked by name, and it offers runnable example workloads."""

import random
from importlib import metadata

import pytest
import torch

import batchplex
import batchplex_vision
from batchplex import InvalidRequestError
from batchplex_vision import DetectionAdapter, ImageAdapter


def test_the_entry_point_is_installed():
    entry_points = {ep.name: ep for ep in metadata.entry_points(group="batchplex")}
    assert entry_points["vision"].value == "batchplex_vision"
    assert entry_points["vision"].dist.metadata["Name"] == "batchplex-vision"


def test_a_plain_scheduler_finds_both_adapters(monkeypatch):
    monkeypatch.delenv("BATCHPLEX_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    monkeypatch.setenv("BATCHPLEX_LOAD_PLUGINS", "vision")
    adapters = batchplex.Scheduler().plugins.adapters()
    assert adapters["image"] == adapters["detection"] == "vision"
    assert isinstance(batchplex.Scheduler().plugins.adapter("image"), ImageAdapter)


def test_blocking_the_plugin_by_name_leaves_the_core_working(monkeypatch):
    monkeypatch.setenv("BATCHPLEX_LOAD_PLUGINS", "some-other-plugin")
    adapters = batchplex.Scheduler().plugins.adapters()
    assert "image" not in adapters and "detection" not in adapters and "tensor" in adapters


def test_registered_as_a_run_time_plugin_without_autoload():
    adapters = batchplex.Scheduler(plugins=[batchplex_vision], autoload=False).plugins.adapters()
    assert {"image", "detection", "tensor"} <= set(adapters)


def test_each_workload_gets_its_own_configured_adapter():
    scheduler = batchplex.Scheduler(plugins=[batchplex_vision], autoload=False)
    small = scheduler.add_workload("small", adapter="image", model=torch.nn.Identity(),
                                   adapter_options={"size": 32})
    large = scheduler.add_workload("large", adapter="image", model=torch.nn.Identity())
    detect = scheduler.add_workload("detect", adapter="detection", model=torch.nn.Identity(),
                                    adapter_options={"results_on_device": True})
    assert (small.adapter.size, large.adapter.size) == ((32, 32), (224, 224))
    assert isinstance(detect.adapter, DetectionAdapter) and detect.adapter.copy_output_to_host is False


def test_example_workloads_run_their_own_requests():
    examples = {w.name: w for w in batchplex_vision.example_workloads(device=torch.device("cpu"))}
    assert set(examples) == {"classify", "detect"}
    rng = random.Random(0)
    for example in examples.values():
        adapter = batchplex.Scheduler(plugins=[batchplex_vision], autoload=False).plugins.adapter(
            example.adapter).configure(**example.adapter_options)
        items = [adapter.prepare(example.make_request(rng)) for _ in range(2)]
        with torch.inference_mode():
            output = example.model(adapter.collate(items, torch.device("cpu"), len(items)))
        assert len(adapter.split(output, items)) == 2
        with pytest.raises(InvalidRequestError):
            adapter.prepare(example.make_bad_request(rng))
