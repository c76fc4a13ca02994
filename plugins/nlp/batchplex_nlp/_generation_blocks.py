"""`BlockEngine`: batchplex's own generation step loop over a paged KV cache (the ``generation`` adapter's default).

It runs the Hugging Face model itself, with `PagedKVCache` as its ``past_key_values`` (any decoder whose attention
calls ``past_key_values.update(key, value, layer_idx)``: Llama, Mistral, Qwen2, GPT-2, ...), explicit positions and
an explicit 4D additive attention mask, so padding and causality are exact and the model never builds a mask itself
(the ``sdpa`` and ``eager`` attention implementations take such a mask; a model set to another one runs ``sdpa``
while the engine lives). Each `step`:

1. every running sequence about to write past its last block gets one more block; when none is free, the newest
   running sequence is *preempted*: its blocks are freed and it goes back to the front of the queue, its generated
   tokens appended to its prompt (recomputed when it is admitted again; tokens already reported stay reported);
2. waiting sequences join while the active cap, the step's token budget (counting the prefill's padding: rows x
   the longest prompt) and the free blocks allow (in order: one that does not fit stops admission; the first one
   always fits the budget), and get their prompts' blocks;
3. one padded forward prefills the joining sequences (left-padded, so the last column is every prompt's last
   token) and gives each its first token;
4. one decode forward gives every sequence that was already running its next token; on CUDA it replays a CUDA
   graph (`DecodeGraphs`: one per batch-size and context-length bucket, all captured when the engine starts;
   decoding runs eagerly, logged, where capture fails);
5. greedy argmax, or temperature / top-k / top-p sampling with one row of settings per sequence.

The host work of a step is a few list comprehensions over the running sequences, one small host-to-device copy
(token ids, positions, table rows) and one device-to-host copy (the tokens): cache indices and the mask are built
by tensor ops from the block tables, on the device.
"""

from __future__ import annotations

import bisect
import gc
import inspect
import logging
import math
import time
from collections import deque
from typing import Any

import torch
from transformers import GenerationConfig

from ._decode_graphs import DecodeGraphs
from ._kv_blocks import BlockTables, PagedKVCache, block_bytes

__all__ = ["BlockEngine", "Progress"]

log = logging.getLogger("batchplex")

#: One sequence after a step: request id, every token it generated so far, whether it ended, its error if any.
Progress = tuple[str, list[int], bool, "str | None"]
#: Sampling parameters and their neutral value (a top_k of 0 keeps every token).
_SAMPLING = {"temperature": 1.0, "top_k": 0, "top_p": 1.0}


class _Sequence:
    __slots__ = ("blocks", "cached", "eos", "generated", "max_new_tokens", "prompt", "request_id", "row", "sampling")

    def __init__(self, request_id: str, prompt: list[int], max_new_tokens: int, eos: frozenset[int] | None,
                 sampling: tuple[float, int, float]) -> None:
        self.request_id = request_id
        self.prompt = prompt
        self.generated: list[int] = []
        self.max_new_tokens = max_new_tokens
        self.eos = eos
        self.sampling = sampling
        self.row: int | None = None  # its block table row while it runs
        self.blocks: list[int] = []
        self.cached = 0  # tokens whose keys and values are in the cache


class BlockEngine:
    """One model, its paged KV cache and its running sequences, stepped by the caller's thread (see the module
    docstring). Same interface as `PagedEngine`."""

    def __init__(self, model: torch.nn.Module, generation_config: GenerationConfig, *, max_active: int,
                 max_batch_tokens: int, max_length: int, num_blocks: int | None, block_size: int,
                 max_memory_percent: float, per_request_sampling: bool, seed: int | None,
                 cuda_graphs: bool = True) -> None:
        parameter = next(model.parameters())
        device, dtype = parameter.device, parameter.dtype
        config = model.config.get_text_config()
        window = getattr(config, "sliding_window", None)
        if window and getattr(config, "use_sliding_window", True) and max_length > window:
            raise ValueError(f"the model attends within a sliding window of {window} tokens, which batchplex's step "
                             f"loop does not mask; lower max_length to {window} or use engine='transformers'")
        self.max_blocks = math.ceil(max_length / block_size)  # of one sequence
        if num_blocks is None:
            num_blocks = (int(torch.cuda.mem_get_info(device)[0] * max_memory_percent)
                          // block_bytes(config, block_size, dtype) if device.type == "cuda"
                          else max_active * self.max_blocks)
        if num_blocks < self.max_blocks:
            raise ValueError(f"the KV cache holds {num_blocks} blocks of {block_size} tokens, fewer than one "
                             f"sequence of max_length={max_length} needs ({self.max_blocks}); make the cache larger "
                             f"or lower max_length")
        self.model = model
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.max_active = max_active
        self.max_batch_tokens = max_batch_tokens
        self._attention = model.config._attn_implementation
        if self._attention not in ("sdpa", "eager"):  # those take an explicit 4D mask; restored by close()
            log.info("generation: attention %r switched to 'sdpa' for batchplex's paged cache", self._attention)
            model.set_attn_implementation("sdpa")
        # The cache's keyword: ``cache`` in transformers 5.24, ``past_key_values`` in 5.17.
        self._cache_argument = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        self._tables = BlockTables(num_blocks, max_active, self.max_blocks, device)
        self._cache = PagedKVCache(config, num_blocks, block_size, dtype, device)
        self._mask_min = torch.finfo(dtype).min
        columns = torch.arange(self.max_blocks * block_size, device=device)
        self._columns, self._column_block, self._column_offset = columns, columns // block_size, columns % block_size
        self._sampling = _sampling_defaults(generation_config)
        #: Sampling parameters a request may set: those whose default is not neutral.
        self.per_request_keys = frozenset(key for key, value in zip(_SAMPLING, self._sampling or ())
                                          if per_request_sampling and value != _SAMPLING[key])
        self._generator = None
        if self._sampling is not None:
            self._generator = torch.Generator(device)
            if seed is None:
                self._generator.seed()
            else:
                self._generator.manual_seed(seed)
        self._sequences: dict[str, _Sequence] = {}
        self._waiting: deque[_Sequence] = deque()
        self._running: list[_Sequence] = []  # in admission order: the last one is preempted first
        self.preemptions = 0
        self._batch_buckets = _buckets(max_active, halfway=False)
        self._length_buckets = _buckets(self.max_blocks, halfway=True)
        self._graphs = self._capture_graphs(device) if cuda_graphs and device.type == "cuda" else None

    def _capture_graphs(self, device: torch.device) -> DecodeGraphs | None:
        """The decode graphs of every batch and length bucket, captured now (on padding rows, so nothing but the
        scratch block is written); None, logged, where capture fails: decoding then runs eagerly."""
        started = time.perf_counter()
        graphs = DecodeGraphs(self._forward, self.max_active, (0, -1, self._tables.padding_row), device)
        try:
            with torch.inference_mode():
                self._tables.sync()
                for batch in self._batch_buckets:
                    for blocks in self._length_buckets:
                        graphs.capture(batch, blocks * self.block_size)
        except RuntimeError as error:
            _graphs_failed(error)
            return None
        log.info("generation: captured %d decode CUDA graphs in %.1f s", len(graphs), time.perf_counter() - started)
        return graphs

    # ------------------------------------------------------------------ requests
    def add(self, request_id: str, prompt: list[int], max_new_tokens: int, eos_token_id: int | list[int] | None,
            sampling: dict[str, Any]) -> None:
        unknown = set(sampling) - self.per_request_keys
        if unknown:
            raise ValueError(f"request {request_id}: sampling parameters {sorted(unknown)} cannot be set per "
                             f"request; these can: {sorted(self.per_request_keys)}")
        settings = tuple(sampling.get(key, default) for key, default in zip(_SAMPLING, self._sampling or ()))
        eos = None if eos_token_id is None else frozenset(
            [eos_token_id] if isinstance(eos_token_id, int) else eos_token_id)
        sequence = _Sequence(request_id, list(prompt), max_new_tokens, eos, settings)
        self._sequences[request_id] = sequence
        self._waiting.append(sequence)

    def cancel(self, request_id: str) -> None:
        """Drop a waiting or running sequence and free its blocks now (no-op for a finished one)."""
        sequence = self._sequences.pop(request_id, None)
        if sequence is None:
            return
        if sequence.row is None:
            self._waiting.remove(sequence)
        else:
            self._running.remove(sequence)
            self._release(sequence)

    def free_fraction(self) -> float:
        """The share of the KV cache not held by any sequence."""
        return self._tables.free_blocks() / self.num_blocks

    # ------------------------------------------------------------------ one step
    def step(self) -> list[Progress]:
        """One iteration: ``(request_id, tokens generated so far, finished, error)`` for each sequence that got a
        token (a preempted or still waiting one gets none)."""
        self._reserve_decode_blocks()
        decoding = list(self._running)
        joining = self._admit()
        progress: list[Progress] = []
        if joining:
            self._advance(joining, self._prefill(joining), progress)
        if decoding:
            self._advance(decoding, self._decode(decoding), progress)
        return progress

    def _reserve_decode_blocks(self) -> None:
        """A block for every running sequence whose next token starts one, preempting the newest when none is
        free (possibly the sequence itself: it then waits for blocks to come back)."""
        block_size = self.block_size
        for sequence in [s for s in self._running if s.cached == len(s.blocks) * block_size]:
            while sequence.row is not None and not self._tables.grow(sequence.row, sequence.blocks, 1):
                self._preempt_newest()

    def _preempt_newest(self) -> None:
        sequence = self._running.pop()
        self._release(sequence)
        self._waiting.appendleft(sequence)
        self.preemptions += 1
        log.info("KV cache full: sequence %s preempted after %d tokens (recomputed when readmitted)",
                 sequence.request_id, len(sequence.generated))

    def _admit(self) -> list[_Sequence]:
        """Waiting sequences that join this step. The prefill is one left-padded forward, so the budget counts what
        it runs: rows x the longest prompt, next to one token per running sequence."""
        joining: list[_Sequence] = []
        room = self.max_batch_tokens - len(self._running)
        width = 0
        while self._waiting and len(self._running) + len(joining) < self.max_active:
            sequence = self._waiting[0]
            tokens = len(sequence.prompt) + len(sequence.generated)
            if joining and (len(joining) + 1) * max(width, tokens) > room:  # the first always goes: a preempted
                break                                                          # prompt may have outgrown it
            row = self._tables.open()
            if not self._tables.grow(row, sequence.blocks, math.ceil(tokens / self.block_size)):
                self._tables.close(row, sequence.blocks)
                break
            sequence.row = row
            joining.append(self._waiting.popleft())
            width = max(width, tokens)
        self._running += joining
        return joining

    def _advance(self, sequences: list[_Sequence], tokens: list[int], progress: list[Progress]) -> None:
        for sequence, token in zip(sequences, tokens):
            sequence.generated.append(token)
            finished = len(sequence.generated) >= sequence.max_new_tokens or (
                sequence.eos is not None and token in sequence.eos)
            if finished:
                del self._sequences[sequence.request_id]
                self._running.remove(sequence)
                self._release(sequence)
            progress.append((sequence.request_id, sequence.generated, finished, None))

    def _release(self, sequence: _Sequence) -> None:
        self._tables.close(sequence.row, sequence.blocks)
        sequence.row = None
        sequence.cached = 0

    # ------------------------------------------------------------------ forwards
    def _prefill(self, joining: list[_Sequence]) -> list[int]:
        """One left-padded forward over the joining sequences' prompts; their first tokens."""
        device = self._columns.device
        lengths = [len(s.prompt) + len(s.generated) for s in joining]
        width = max(lengths)
        flat: list[int] = []
        for sequence in joining:
            flat += sequence.prompt
            flat += sequence.generated
        positions = torch.arange(width) - (width - torch.tensor(lengths))[:, None]
        ids = torch.zeros(len(joining), width, dtype=torch.long)
        ids[positions >= 0] = torch.tensor(flat)
        rows = torch.tensor([s.row for s in joining])
        self._tables.sync()
        logits = self._forward(ids.to(device), positions.clamp(min=-1).to(device), rows.to(device),
                               math.ceil(width / self.block_size) * self.block_size)
        for sequence, length in zip(joining, lengths):
            sequence.cached = length
        return self._choose(logits, joining)

    def _decode(self, decoding: list[_Sequence]) -> list[int]:
        """One forward of every running sequence's last token; their next tokens."""
        ids = [s.generated[-1] for s in decoding]
        positions = [s.cached for s in decoding]
        rows = [s.row for s in decoding]
        blocks = max(positions) // self.block_size + 1
        self._tables.sync()
        logits = None if self._graphs is None else self._replay(ids, positions, rows, blocks)
        if logits is None:
            meta = torch.tensor([ids, positions, rows]).to(self._columns.device)
            logits = self._forward(meta[0, :, None], meta[1, :, None], meta[2], blocks * self.block_size)
        for sequence in decoding:
            sequence.cached += 1
        return self._choose(logits, decoding)

    def _replay(self, ids: list[int], positions: list[int], rows: list[int], blocks: int) -> torch.Tensor | None:
        """The decode logits from the CUDA graph of the batch and length buckets; None, and eager decoding from
        now on, if the replay fails."""
        count = len(ids)
        padding = self._batch_buckets[bisect.bisect_left(self._batch_buckets, count)] - count
        blocks = self._length_buckets[bisect.bisect_left(self._length_buckets, blocks)]
        meta = torch.tensor([ids + [0] * padding, positions + [-1] * padding,
                             rows + [self._tables.padding_row] * padding])
        try:
            return self._graphs.replay(meta, blocks * self.block_size)[:count]
        except RuntimeError as error:
            _graphs_failed(error)
            self._graphs = None
            return None

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor, rows: torch.Tensor, length: int) -> torch.Tensor:
        """The model over ``ids`` (``[B, q]``) at ``positions`` (-1: padding) of the sequences in table ``rows``,
        attending to their first ``length`` cached positions; the last column's logits ``[B, vocab]``."""
        block_size = self.block_size
        table = self._tables.device[rows]
        known = positions.clamp(min=0)  # a padding query attends to position 0: no row of the mask is empty
        slots = table.gather(1, known // block_size) * block_size + known % block_size
        self._cache.slots = slots.masked_fill(positions < 0, self._tables.scratch * block_size).flatten()
        self._cache.index = table[:, self._column_block[:length]] * block_size + self._column_offset[:length]
        hidden = self._columns[:length] > known[..., None]  # [B, q, L]
        mask = torch.zeros(hidden.shape, dtype=self._cache.keys[0].dtype, device=hidden.device)
        mask = mask.masked_fill_(hidden, self._mask_min)[:, None]
        output = self.model(input_ids=ids, position_ids=known, attention_mask=mask, use_cache=True,
                            logits_to_keep=1, **{self._cache_argument: self._cache})
        return output.logits[:, -1]

    def _choose(self, logits: torch.Tensor, sequences: list[_Sequence]) -> list[int]:
        if self._sampling is None:
            return logits.argmax(-1).tolist()
        settings = torch.tensor([s.sampling for s in sequences], dtype=torch.float32).to(logits.device)
        return sample(logits, settings, self._generator).tolist()

    def close(self) -> None:
        """Free the cache and the graphs and put the model's attention implementation back."""
        self._graphs = self._cache = self._tables = None
        self._sequences.clear()
        self._waiting.clear()
        self._running.clear()
        if self.model.config._attn_implementation != self._attention:
            self.model.set_attn_implementation(self._attention)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def sample(logits: torch.Tensor, settings: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One token per row of ``logits`` (``[B, vocab]``), with that row's ``settings`` (temperature, top_k (0: all),
    top_p), applied in that order, like transformers' logits warpers."""
    temperature, top_k, top_p = settings.unbind(1)
    ordered, order = (logits.float() / temperature[:, None]).sort(dim=-1, descending=True)
    rank = torch.arange(logits.shape[-1], device=logits.device)
    ordered = ordered.masked_fill(rank >= torch.where(top_k > 0, top_k, logits.shape[-1])[:, None], -math.inf)
    probabilities = ordered.softmax(-1)
    before = probabilities.cumsum(-1) - probabilities  # the mass of the tokens ranked above
    ordered = ordered.masked_fill((before >= top_p[:, None]) & (rank > 0), -math.inf)
    choice = torch.multinomial(ordered.softmax(-1), 1, generator=generator)
    return order.gather(1, choice)[:, 0]


def _graphs_failed(error: RuntimeError) -> None:
    log.warning("generation: CUDA graphs of the decode step failed, decoding eagerly: %s", error)


def _sampling_defaults(config: GenerationConfig) -> tuple[float, int, float] | None:
    """The generation config's temperature, top_k, top_p (unset: neutral); None for greedy decoding."""
    if not config.do_sample:
        return None
    return tuple(type(neutral)(getattr(config, key) if getattr(config, key) is not None else neutral)
                 for key, neutral in _SAMPLING.items())


def _buckets(limit: int, halfway: bool) -> list[int]:
    """Powers of two below ``limit`` (and, with ``halfway``, 3, 6, 12, ... between them), then ``limit``. The
    number of CUDA graphs grows with log(limit); padding a batch to a power of two costs a decode step little (it
    reads the weights once for all rows), padding a context to a halfway bucket wastes at most a third."""
    sizes = {limit}
    power = 1
    while power < limit:
        sizes.update(size for size in (power, power * 3 // 2 if halfway else power) if size < limit)
        power *= 2
    return sorted(sizes)
