"""Serve batchplex workloads from Ray Serve.

Ray routes requests, scales replicas and places them on GPUs; inside each replica one batchplex `Scheduler` batches
every workload on that replica's device. `build_app` turns a list of `WorkloadSpec` into a Serve application;
`collect_statistics` gathers ``statistics()`` from every replica.
"""

from .codec import compact_result, decode_item, encode_image, encode_result
from .deployment import BatchplexDeployment, build_app, collect_statistics
from .spec import WorkloadSpec

__all__ = ["BatchplexDeployment", "WorkloadSpec", "build_app", "collect_statistics", "compact_result", "decode_item",
           "encode_image", "encode_result"]
