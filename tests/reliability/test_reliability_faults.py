"""Cases 1 and 2 of the reliability suite, short versions: poisonous requests and out-of-memory batches.

The scenarios live in ``benchmarks/reliability`` (shared with the long runs of ``python -m
benchmarks.reliability.run``); each test runs one on a probe loop and asserts every promise it checks.
"""

from benchmarks.reliability import scenarios


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
