"""The ``batchplex`` command: the demo runs to completion; ``plugins`` lists what is installed."""


from batchplex import cli
from batchplex._demo import run_demo

def test_plugins_lists_installed_plugins_and_builtin_adapters(capsys, monkeypatch):
    monkeypatch.setenv("BATCHPLEX_LOAD_PLUGINS", "nothing-else")
    assert cli.main(["plugins"]) == 0
    out = capsys.readouterr().out
    assert "sample" in out and "blocked" in out and "batchplex-sample-plugin" in out
    assert "built-in adapters: tensor" in out

async def test_demo_batches_a_short_stream_and_isolates_bad_requests():
    stats = await run_demo(duration_s=1.5, live=False, bad_share=0.05, device="cpu", only=["mlp"])
    mlp = stats["mlp"]
    assert mlp["completed"] > 50
    assert mlp["failed"] == 0
    assert mlp["rejected_invalid"] > 0  # the malformed share failed at submit, alone
    assert mlp["mean_batch_size"] > 1
