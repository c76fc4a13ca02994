"""Plugin discovery and registration: entry points of an installed plugin, env switches, run-time plugins."""

import inspect

import pluggy
import pytest
import torch

import batchplex
from batchplex import hookspecs
from batchplex.builtin_adapters import TensorAdapter
from batchplex.plugins import PluginHost, get_plugin_manager, installed_plugins
from batchplex.workloads import ExampleWorkload

# Installed editable by the set-up command (tests/sample_plugin): a real distribution with a `batchplex` entry point.
SAMPLE = "sample"


@pytest.fixture
def pm():
    """A plugin manager with autoload off: only the built-in plugin."""
    return get_plugin_manager(autoload=False)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    monkeypatch.delenv("BATCHPLEX_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    monkeypatch.delenv("BATCHPLEX_LOAD_PLUGINS", raising=False)


class Echo(batchplex.Adapter):
    name = "echo"

    def prepare(self, item, **params):
        return item

    def collate(self, items, device, batch_size):
        return torch.tensor(items, device=device)

    def split(self, output, items):
        return output.tolist()


class EchoPlugin:
    @batchplex.hookimpl
    def register_adapters(self, register):
        register(Echo())


def test_builtin_tensor_adapter_is_registered_through_the_hook(pm):
    assert pm.get_plugin("batchplex.builtin") is not None
    host = PluginHost(autoload=False)
    assert host.adapters() == {"tensor": "batchplex.builtin"}
    assert isinstance(host.adapter("tensor"), TensorAdapter)


def test_installed_plugin_is_found_through_its_entry_point():
    found = {plugin.name: plugin for plugin in installed_plugins()}
    assert found[SAMPLE].distribution == "batchplex-sample-plugin"
    host = PluginHost()
    assert host.adapters()["sample-doubler"] == SAMPLE
    assert host.pm.get_plugin(SAMPLE) is not None


def test_disable_autoload_switch(monkeypatch):
    monkeypatch.setenv("BATCHPLEX_DISABLE_PLUGIN_AUTOLOAD", "1")
    host = PluginHost()
    assert "sample-doubler" not in host.adapters()
    assert "tensor" in host.adapters()
    assert all(plugin.blocked for plugin in installed_plugins())


def test_allow_list_blocks_the_other_plugins_by_name(monkeypatch):
    monkeypatch.setenv("BATCHPLEX_LOAD_PLUGINS", "some-other-plugin")
    host = PluginHost()
    assert "sample-doubler" not in host.adapters()
    assert host.pm.is_blocked(SAMPLE)
    monkeypatch.setenv("BATCHPLEX_LOAD_PLUGINS", f"nlp, {SAMPLE}")
    assert "sample-doubler" in PluginHost().adapters()


def test_run_time_plugin_and_adapter_registration():
    host = PluginHost(plugins=[EchoPlugin()], autoload=False)
    assert host.adapters()["echo"].startswith("EchoPlugin")

    scheduler = batchplex.Scheduler(autoload=False)
    scheduler.register_plugin(EchoPlugin())
    assert "echo" in scheduler.plugins.adapters()

    class Other(Echo):
        name = "other"

    scheduler.register_adapter(Other())
    assert scheduler.plugins.adapters()["other"] == "run-time"


def test_duplicate_adapter_name_is_an_error_naming_both_plugins():
    class Clash:
        @batchplex.hookimpl
        def register_adapters(self, register):
            register(TensorAdapter())

    with pytest.raises(batchplex.DuplicateAdapterError) as caught:
        PluginHost(plugins=[Clash()], autoload=False)
    message = str(caught.value)
    assert "'tensor'" in message and "batchplex.builtin" in message and "Clash" in message


def test_misspelled_hook_fails_loudly():
    class Typo:
        @batchplex.hookimpl
        def register_adapter(self, register):  # missing "s"
            pass

    with pytest.raises(pluggy.PluginValidationError, match="register_adapter"):
        get_plugin_manager(plugins=[Typo()], autoload=False)


def test_registering_something_that_is_not_an_adapter_is_refused():
    class Bad:
        @batchplex.hookimpl
        def register_adapters(self, register):
            register(object())

    with pytest.raises(batchplex.PluginError, match="not a batchplex.Adapter"):
        PluginHost(plugins=[Bad()], autoload=False)


def test_unknown_adapter_lists_the_known_ones():
    host = PluginHost(autoload=False)
    with pytest.raises(batchplex.UnknownAdapterError, match=r"'nope'.*known: tensor"):
        host.adapter("nope")


def test_batch_finished_observers_see_every_batch():
    records = []

    class Observer:
        @batchplex.hookimpl
        def batch_finished(self, record):
            records.append(record)

    host = PluginHost(plugins=[Observer()], autoload=False)
    host.batch_finished("a record")
    assert records == ["a record"]


async def test_installed_plugin_adapter_runs_in_a_scheduler():
    async with batchplex.Scheduler() as scheduler:
        scheduler.add_workload("double", adapter="sample-doubler", model=lambda batch: batch + 1)
        assert await scheduler.submit("double", 20) == pytest.approx(41.0)


def test_example_workloads_are_joined_across_plugins():
    class Offers:
        @batchplex.hookimpl
        def example_workloads(self, device):
            return [ExampleWorkload(name="extra", adapter="tensor", model=lambda b: b,
                                    make_request=lambda rng: torch.zeros(2))]

    host = PluginHost(plugins=[Offers()], autoload=False)
    names = [w.name for w in host.example_workloads(torch.device("cpu"))]
    assert names == ["mlp", "extra"]


def test_every_hook_has_a_docstring_and_a_test():
    hooks = [name for name, fn in inspect.getmembers(hookspecs, inspect.isfunction)
             if hasattr(fn, "batchplex_spec")]
    assert sorted(hooks) == ["batch_finished", "example_workloads", "register_adapters"]
    this_file = inspect.getsource(inspect.getmodule(test_every_hook_has_a_docstring_and_a_test))
    for name in hooks:
        doc = inspect.getdoc(getattr(hookspecs, name)) or ""
        assert "Called" in doc, f"hook {name} must say when it is called"
        assert f"def {name}(" in this_file, f"hook {name} has no test implementing it here"
