"""The reliability suite's scenarios: faults, overload, cancellation, shutdown, bad input and a soak.

Each case is an async function in `scenarios` (or `bad_input`) with parameters for a short run (CI, through
``tests/reliability``) and a long one (``python -m benchmarks.reliability.run``); it returns plain numbers that the
tests assert on and the runner writes to ``benchmarks/results/reliability-<case>.json`` with one figure each.
"""
