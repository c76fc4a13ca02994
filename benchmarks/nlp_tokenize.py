"""Where and how to tokenize text requests: the cost of each tokenizer entry point, padding with the tokenizer vs
into one buffer, and tokenizing at submit on the event loop vs off it under load.

* one text: microseconds per call of ``tokenizer(text)``, ``tokenizer.backend_tokenizer.encode(text)``, the
  adapter's own backend copy (``encode_batch_fast([text])``) and the whole of ``TextAdapter.prepare``;
* the ids path per request, at the GPU benchmark's shape (128 requests of 128 tokens, MiniLM's 384-wide
  output): ``TextAdapter.prepare`` of an int32 array (what ``nlp_common.token_ids`` makes), a list of ints and an
  int64 tensor; ``collate`` of the 128 requests and ``split`` of the mean-pooled output, each per row;
* padding 256 pre-tokenized sequences (log-normal 5-512 tokens): ``tokenizer.pad``,
  ``DataCollatorWithPadding`` and ``TextAdapter.collate``;
* under load: ``--concurrency`` closed-loop clients each submit a text (log-normal length) and await its
  embedding, for ``--duration`` seconds per mode, modes interleaved over ``--rounds`` rounds (median reported):
  ``loop`` (``await scheduler.submit``: tokenized on the event loop), ``pool-W`` (``submit_nowait`` on W pool
  threads), ``threads`` (every client an OS thread calling ``submit_nowait(...).result()``). A heartbeat
  coroutine records how late the event loop wakes up (loop lag). The model is an embedding lookup with mean
  pooling, cheap enough that tokenizing and scheduling bound the throughput.

    python benchmarks/nlp_tokenize.py                 # this machine's CPU; about a minute

Results go to ``benchmarks/results/<--out>.json`` and ``.md``, stamped with the CPU, the command and the date.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import threading
import time
import timeit
from typing import Any

import torch
from harness import write_results
from nlp_common import ThreadedSubmit, lognormal_length, text, token_ids

from batchplex import BatchPolicy, Scheduler
from batchplex_nlp import TextAdapter
from batchplex_nlp.testing import load_minilm


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu",), default="cpu", help="tokenizing is host work")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--duration", type=float, default=3.0, help="seconds per mode and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--modes", default="loop,pool-2,pool-8,threads")
    parser.add_argument("--repeat", type=int, default=100, help="calls per timing of one tokenization")
    parser.add_argument("--torch-threads", type=int, default=1,
                        help="torch intra-op threads (default 1: with more, on a small machine every CPU op of "
                             "the executor threads can wait milliseconds for descheduled OpenMP workers)")
    parser.add_argument("--out", default="nlp-tokenize-cpu", help="result file stem under benchmarks/results")
    return parser.parse_args()


def per_call(tokenizer, repeat: int) -> list[dict[str, Any]]:
    adapter = TextAdapter(tokenizer)
    backend = tokenizer.backend_tokenizer
    rows = []
    for words in (10, 70, 480):
        sample = text(random.Random(words), words)
        ways = {
            "tokenizer(text)": lambda: tokenizer(sample, truncation=True, max_length=512),
            "tokenizer.backend_tokenizer.encode(text)": lambda: backend.encode(sample),
            "own backend copy .encode_batch_fast([text])": lambda: adapter._encoder._batch_encode([sample]),
            "TextAdapter.prepare(text)": lambda: adapter.prepare(sample),
        }
        for way, call in ways.items():
            call()
            seconds = min(timeit.repeat(call, number=repeat, repeat=5)) / repeat
            rows.append({"tokens": adapter.prepare(sample).length, "way": way, "us": seconds * 1e6})
    return rows


def ids_path(tokenizer, repeat: int, rows: int = 128, tokens: int = 128) -> list[dict[str, Any]]:
    """Microseconds per request of each host step a pre-tokenized request goes through (collate and split are
    timed per batch of ``rows`` and divided by it)."""
    adapter = TextAdapter(tokenizer, max_length=tokens)
    rng = random.Random(4)
    ids = token_ids(rng, tokens)
    as_list, as_tensor = ids.tolist(), torch.from_numpy(ids).long()
    items = [adapter.prepare(token_ids(rng, tokens)) for _ in range(rows)]
    pooled = torch.randn(rows, 384)
    cpu = torch.device("cpu")
    ways = {
        "prepare(int32 array)": (lambda: adapter.prepare(ids), 1),
        "prepare(list of ints)": (lambda: adapter.prepare(as_list), 1),
        "prepare(int64 tensor)": (lambda: adapter.prepare(as_tensor), 1),
        f"collate({rows} requests), per row": (lambda: adapter.collate(items, cpu, rows), rows),
        f"split(({rows}, 384) pooled output), per row": (lambda: adapter.split(pooled, items), rows),
    }
    result = []
    for way, (call, per) in ways.items():
        call()
        seconds = min(timeit.repeat(call, number=repeat * 10, repeat=5)) / (repeat * 10)
        result.append({"tokens": tokens, "way": way, "us": seconds / per * 1e6})
    return result


def padding(tokenizer, n: int, repeat: int) -> list[dict[str, Any]]:
    from transformers import DataCollatorWithPadding
    rng = random.Random(3)
    ids = [token_ids(rng, lognormal_length(rng)) for _ in range(n)]
    features = [{"input_ids": row.tolist(), "token_type_ids": [0] * row.size} for row in ids]
    adapter = TextAdapter(tokenizer)
    items = [adapter.prepare(row) for row in ids]
    collator = DataCollatorWithPadding(tokenizer, pad_to_multiple_of=8, return_tensors="pt")
    ways = {
        "tokenizer.pad(features)": lambda: tokenizer.pad(features, pad_to_multiple_of=8, return_tensors="pt"),
        "DataCollatorWithPadding(features)": lambda: collator(features),
        "TextAdapter.collate(items)": lambda: adapter.collate(items, torch.device("cpu"), n),
    }
    rows = []
    for way, call in ways.items():
        call()
        seconds = min(timeit.repeat(call, number=repeat, repeat=3)) / repeat
        rows.append({"sequences": n, "way": way, "ms": seconds * 1e3})
    return rows


async def under_load(mode: str, tokenizer, model, args: argparse.Namespace) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    latencies: list[float] = []
    lags: list[float] = []
    rng = random.Random(1)
    texts = [text(rng, max(1, lognormal_length(rng) * 3 // 4)) for _ in range(512)]
    stop_at = 0.0

    def stream(offset: int):
        index = offset
        while time.perf_counter() < stop_at:
            yield texts[index % len(texts)]
            index += args.concurrency

    async with Scheduler() as scheduler:
        scheduler.add_workload("t", adapter=TextAdapter(tokenizer), model=model,
                               policy=BatchPolicy(max_batch_size=args.batch, max_wait_ms=2, max_queue=1 << 20))
        await scheduler.submit("t", "warm up")
        client = ThreadedSubmit(scheduler, int(mode.split("-")[1])) if mode.startswith("pool") else scheduler

        async def coroutine_client(offset: int) -> None:
            for item in stream(offset):
                sent = time.perf_counter()
                await client.submit("t", item)
                latencies.append(time.perf_counter() - sent)

        def thread_client(offset: int) -> None:
            for item in stream(offset):
                sent = time.perf_counter()
                scheduler.submit_nowait("t", item).result()
                latencies.append(time.perf_counter() - sent)

        async def heartbeat() -> None:
            while time.perf_counter() < stop_at:
                started = loop.time()
                await asyncio.sleep(0.001)
                lags.append(loop.time() - started - 0.001)

        started = time.perf_counter()
        stop_at = started + args.duration
        beat = asyncio.ensure_future(heartbeat())
        if mode == "threads":
            threads = [threading.Thread(target=thread_client, args=(i,)) for i in range(args.concurrency)]
            for thread in threads:
                thread.start()
            await asyncio.to_thread(lambda: [thread.join() for thread in threads])
        else:
            await asyncio.gather(*(coroutine_client(i) for i in range(args.concurrency)))
        elapsed = time.perf_counter() - started
        await beat
        stats = scheduler.statistics()["t"]
    ms = sorted(latency * 1e3 for latency in latencies)
    lag = sorted(value * 1e3 for value in lags)
    return {"mode": mode, "requests_per_s": len(ms) / elapsed, "p50_ms": ms[len(ms) // 2],
            "p99_ms": ms[int(len(ms) * 0.99)], "loop_lag_p50_ms": lag[len(lag) // 2],
            "loop_lag_p99_ms": lag[int(len(lag) * 0.99)], "mean_batch": stats["mean_batch_size"]}


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.torch_threads)
    tokenizer, _ = load_minilm(random_weights=True)
    calls = per_call(tokenizer, args.repeat)
    ids = ids_path(tokenizer, args.repeat)
    pads = padding(tokenizer, 256, max(3, args.repeat // 10))
    embedding = torch.nn.Embedding(len(tokenizer), 384)

    def model(batch):
        return embedding(batch["input_ids"])

    modes = args.modes.split(",")
    rounds: dict[str, list[dict[str, Any]]] = {mode: [] for mode in modes}
    for _ in range(args.rounds):  # interleaved, so a drifting machine load hits every mode alike
        for mode in modes:
            rounds[mode].append(asyncio.run(under_load(mode, tokenizer, model, args)))
    loads = {mode: {key: statistics.median(run[key] for run in runs) for key in runs[0] if key != "mode"}
             for mode, runs in rounds.items()}

    rows = [[f"one text, {r['tokens']} tokens: {r['way']}", f"{r['us']:.1f} us"] for r in calls]
    rows += [[f"{r['tokens']} token ids: {r['way']}", f"{r['us']:.2f} us"] for r in ids]
    rows += [[f"pad {r['sequences']} pre-tokenized sequences: {r['way']}", f"{r['ms']:.2f} ms"] for r in pads]
    rows += [[f"under load ({args.concurrency} clients, median of {args.rounds}): {mode}",
              f"{r['requests_per_s']:.0f} requests/s; latency p50 {r['p50_ms']:.1f} ms, p99 {r['p99_ms']:.1f} ms; "
              f"loop lag p50 {r['loop_lag_p50_ms']:.2f} ms, p99 {r['loop_lag_p99_ms']:.2f} ms; mean batch "
              f"{r['mean_batch']:.1f}"] for mode, r in loads.items()]
    payload = {"args": vars(args), "per_call": calls, "ids_path": ids, "padding": pads, "under_load": loads,
               "under_load_rounds": rounds}
    path = write_results(args.out, payload, rows, ["measurement", "result"])
    print(path.read_text())


if __name__ == "__main__":
    main()
