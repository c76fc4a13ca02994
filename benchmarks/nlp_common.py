"""Shared by the nlp benchmarks: synthetic requests (a realistic length mix, texts, pre-tokenized ids) and a
submitter that tokenizes off the event loop.

Measuring and writing results is `harness`'s job (the machine, the command and the date on every result).
"""

from __future__ import annotations

import asyncio
import functools
import os
import random
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")

#: Words that BERT's uncased WordPiece vocabulary holds whole: a text of n of them is n + 2 tokens.
WORDS = ("the of and to in is was for that on with as by at from his her an were are which this be or has had not "
         "but first one their its new after who they have two been all during time may other also year into "
         "would city more over school team people most some world season when there only later three between "
         "university state national under river music series while about film government since many early such "
         "received several before model token length memory device kernel queue attention sentence language "
         "question answer search ranking translation summary document paragraph").split()


def lognormal_length(rng: random.Random, low: int = 5, high: int = 512, mu: float = 3.8, sigma: float = 0.9) -> int:
    """A realistic length mix: log-normal token counts (median e**3.8, about 45), clipped to [low, high]."""
    return int(min(high, max(low, rng.lognormvariate(mu, sigma))))


def token_ids(rng: random.Random, length: int) -> np.ndarray:
    """A pre-tokenized request of ``length`` ids: [CLS] random word pieces [SEP], as an int32 array."""
    ids = np.random.default_rng(rng.getrandbits(32)).integers(1000, 29000, size=length, dtype=np.int32)
    ids[0], ids[-1] = 101, 102
    return ids


def text(rng: random.Random, words: int) -> str:
    return " ".join(rng.choices(WORDS, k=words))


class ThreadedSubmit:
    """``await submit(workload, item)`` that tokenizes on a thread pool instead of the event loop.

    ``Scheduler.submit_nowait`` runs the adapter's ``prepare`` in the calling thread; the text adapter's fast
    tokenizer releases the GIL while it tokenizes, so pool threads tokenize while the loop keeps serving.
    """

    def __init__(self, scheduler: Any, workers: int) -> None:
        self.scheduler = scheduler
        self.pool = ThreadPoolExecutor(workers)

    async def submit(self, workload: str, item: Any) -> Any:
        call = functools.partial(self.scheduler.submit_nowait, workload, item)
        return await asyncio.wrap_future(await asyncio.get_running_loop().run_in_executor(self.pool, call))
