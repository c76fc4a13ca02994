"""Cases 1 and 2 of the reliability suite, short versions: poisonous requests and out-of-memory batches.

The scenarios live in ``benchmarks/reliability`` (shared with the long runs of ``python -m
benchmarks.reliability.run``); each test runs one on a probe loop and asserts every promise it checks.
"""

import logging

import torch

from batchplex import _host_threads
from benchmarks.reliability import checks, scenarios


def test_poisonous_requests_fail_alone_with_their_own_typed_error():
    result = scenarios.run_short("poison", "poison")
    for fault in ("adapter", "model"):
        run = result["faults"][fault]
        assert run["bad"] == 10 and run["good_ok"] == 990
        assert run["retried_batches"] >= 1 and run["extra_collate_calls"] > 0
        assert run["bad_error_example"].startswith("RequestFailed: workload 'w': running this request failed")


def test_out_of_memory_splits_batches_serves_everyone_and_remembers_the_limit(device):
    result = scenarios.run_short("oom", "oom", str(device))
    first = result["waves"][0]
    assert first["oom_calls"] > 0 and first["largest_tried_batch"] > result["params"]["limit"]
    assert all(w["largest_ok_batch"] <= result["params"]["limit"] for w in result["waves"]) or device.type == "cuda"
    assert result["probe"]["log_records"], "lowering the batch limit is logged"


def test_the_probe_lets_configuration_advice_pass_and_flags_any_other_warning(monkeypatch, caplog):
    """The wide-pool advice is logged once per process, by whichever case first adds a CUDA workload; it says
    nothing about that case's requests. Any other warning still breaks the promise."""
    monkeypatch.setattr(_host_threads, "_warned", False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 32)
    with caplog.at_level(logging.WARNING, logger="batchplex"):
        _host_threads.warn_if_wide_pool([torch.device("cuda", 0)])
    (advice,) = [record.getMessage() for record in caplog.records]
    probe = {"loop_errors": [], "second_resolutions": 0, "leftover_tasks": [], "leftover_threads": []}

    def logged(*lines):
        return {p.promise: p.ok for p in checks.check_probe({"probe": {**probe, "log_records": list(lines)}})}

    assert all(logged(f"batchplex WARNING: {advice}").values())
    assert not logged(f"batchplex WARNING: {advice}", "batchplex WARNING: something else")[
        "nothing unexpected was logged at WARNING or above"]
