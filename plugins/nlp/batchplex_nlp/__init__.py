"""batchplex-nlp: batchplex adapters for text models.

Registers the ``text`` adapter (encoders: embeddings, per-token states, classification logits) through the
``register_adapters`` hook; the plugin's entry-point name is ``nlp``.

    tokenizer = AutoTokenizer.from_pretrained(path)
    scheduler.add_workload("embed", adapter="text", adapter_options={"tokenizer": tokenizer},
                           model=HFModel(AutoModel.from_pretrained(path)), policy=BatchPolicy(
                               max_batch_size=64, bucket_edges=(16, 32, 64, 128, 256, 512)))
    vector = await scheduler.submit("embed", "a sentence")
"""

from __future__ import annotations

from collections.abc import Callable

import batchplex

from .model import HFModel
from .text import OUTPUTS, TextAdapter

__all__ = ["HFModel", "OUTPUTS", "TextAdapter", "register_adapters"]


@batchplex.hookimpl
def register_adapters(register: Callable[[batchplex.Adapter], None]) -> None:
    register(TextAdapter())
