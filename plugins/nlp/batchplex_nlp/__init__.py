"""batchplex-nlp: batchplex adapters for text models.

Registers the ``text`` adapter (encoders: embeddings, per-token states, classification logits) and the
``generation`` adapter (causal LMs, continuous batching with streamed tokens) through the ``register_adapters``
hook, and offers the ``embed`` example workload to ``batchplex demo``; the plugin's entry-point name is ``nlp``.

    tokenizer = AutoTokenizer.from_pretrained(path)
    scheduler.add_workload("embed", adapter="text", adapter_options={"tokenizer": tokenizer},
                           model=HFModel(AutoModel.from_pretrained(path)), policy=BatchPolicy(
                               max_batch_size=64, bucket_edges=(16, 32, 64, 128, 256, 512)))
    vector = await scheduler.submit("embed", "a sentence")
"""

from __future__ import annotations

from collections.abc import Callable

import batchplex
import torch

from batchplex.workloads import ExampleWorkload

from .generation import GenerationAdapter
from .model import HFModel
from .text import OUTPUTS, TextAdapter

__all__ = ["GenerationAdapter", "HFModel", "OUTPUTS", "TextAdapter", "register_adapters", "example_workloads"]


@batchplex.hookimpl
def register_adapters(register: Callable[[batchplex.Adapter], None]) -> None:
    register(TextAdapter())
    register(GenerationAdapter())


@batchplex.hookimpl
def example_workloads(device: torch.device) -> list[ExampleWorkload]:
    from ._examples import nlp_examples

    return nlp_examples(device)
