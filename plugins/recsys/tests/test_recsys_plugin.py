"""The recsys plugin as installed: found through its entry point, its demo workload, and what happens without
torchrec (the plugin still loads and lists its adapter; configuring a workload says what to install)."""

import asyncio
import random
import subprocess
import sys
import textwrap

import batchplex_recsys
import torch
from batchplex import InvalidRequestError, Scheduler
from batchplex.plugins import PluginHost, installed_plugins
from batchplex_recsys import RankingAdapter
from batchplex_recsys._torchrec import install_hint


def test_the_entry_point_registers_the_ranking_adapter(monkeypatch):
    (plugin,) = [p for p in installed_plugins() if p.name == "recsys"]
    assert plugin.value == "batchplex_recsys" and plugin.distribution == "batchplex-recsys"
    monkeypatch.setenv("BATCHPLEX_LOAD_PLUGINS", "recsys")
    host = PluginHost()
    assert host.adapters()["ranking"] == "recsys"
    assert isinstance(host.adapter("ranking"), RankingAdapter)


async def test_the_demo_workload_runs_and_refuses_its_bad_requests():
    offered = PluginHost(plugins=[batchplex_recsys], autoload=False).example_workloads(torch.device("cpu"))
    (example,) = [workload for workload in offered if workload.adapter == "ranking"]
    assert example.name == "dlrm"
    rng = random.Random(0)
    async with Scheduler(autoload=False, plugins=[batchplex_recsys]) as scheduler:
        scheduler.add_workload(example.name, adapter=example.adapter, adapter_options=example.adapter_options,
                               model=example.model, policy=example.policy)
        good = await asyncio.gather(*(scheduler.submit("dlrm", example.make_request(rng)) for _ in range(12)))
        for _ in range(8):
            try:
                await scheduler.submit("dlrm", example.make_bad_request(rng))
            except InvalidRequestError as error:
                assert error.rule in {"ids < table size", "ids >= 0", "finite dense values", "known feature key"}
            else:
                raise AssertionError("a bad demo request was accepted")
    assert all(torch.isfinite(score).all() for score in good)


def test_without_torchrec_the_plugin_lists_its_adapter_and_configuring_says_what_to_install():
    script = textwrap.dedent("""
        import sys
        sys.modules["torchrec"] = None  # as if torchrec were not installed
        from batchplex.plugins import PluginHost
        import batchplex_recsys
        host = PluginHost(plugins=[batchplex_recsys], autoload=False)
        print("adapters:", sorted(host.adapters()))
        print("ranking examples:", [w.name for w in host.example_workloads("cpu") if w.adapter == "ranking"])
        try:
            host.adapter("ranking").configure(keys=["a"])
        except batchplex_recsys.TorchrecMissingError as error:
            assert isinstance(error, ImportError)
            print(error)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "adapters: ['ranking', 'tensor']" in done.stdout and "ranking examples: []" in done.stdout
    assert "needs torchrec and fbgemm" in done.stdout and "pip install --no-deps torchrec" in done.stdout


def test_the_install_hint_matches_fbgemm_and_torchrec_releases_to_torch():
    hint = install_hint("2.11.0+cu130")
    assert "pip install torchrec==1.6.*" in hint
    assert "pip install fbgemm-gpu-cpu==1.6.* && pip install --no-deps torchrec==1.6.*" in hint
    assert "==" not in install_hint("1.13.1")
