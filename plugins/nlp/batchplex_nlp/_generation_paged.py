"""transformers' continuous batching (paged KV cache, varlen attention, per-request sampling), one step at a time.

``model.init_continuous_batching`` builds a `ContinuousBatchingManager`, whose background thread runs the loop
``prepare_next_batch -> forward -> update_batch`` with its own FIFO admission. batchplex admits, cancels and times
out sequences itself, so `PagedEngine` takes the manager's batch processor and runs that same loop body from the
workload's step thread, one iteration per `step`, and never starts the manager's thread:

* `add` puts a request straight into the processor's scheduler (what the manager's thread does with its input
  queue); its KV blocks are allocated when a step first schedules it, and grow block by block as it generates;
* `cancel` frees a sequence's blocks at once (the scheduler's own cancellation, applied now rather than at the next
  step, so an idle workload holds no memory);
* `step` reports every scheduled sequence's tokens so far, read from its state (no per-token output objects,
  no queue traffic); finished and failed sequences come from the processor's output queue.

Used from transformers 5.17 to 5.24: the config's block size field was renamed (``block_size`` -> ``page_size``),
the cache's free-capacity query changed, and the rest of this surface (``warmup``, the processor's
``prepare_next_batch``/``update_batch``/``scheduler``, ``_generation_step``, ``get_result``, the request state's
fields) is the same. On the CPU,
transformers 5.17 needs ``psutil`` to size the cache.
"""

from __future__ import annotations

import gc
from typing import Any

import torch
from transformers import GenerationConfig
from transformers.generation.configuration_utils import ContinuousBatchingConfig
from transformers.generation.continuous_batching import RequestState, RequestStatus

__all__ = ["PagedEngine", "Progress"]

#: One sequence after a step: request id, every token it generated so far, whether it ended, its error if any.
Progress = tuple[str, list[int], bool, "str | None"]


class PagedEngine:
    """One model's paged KV cache and batch processor, stepped by the caller's thread (see the module docstring)."""

    def __init__(self, model: torch.nn.Module, generation_config: GenerationConfig, *, max_active: int,
                 max_batch_tokens: int, num_blocks: int | None, block_size: int, max_memory_percent: float,
                 prefix_sharing: bool, per_request_sampling: bool, seed: int | None) -> None:
        fields = ContinuousBatchingConfig.__dataclass_fields__
        options: dict[str, Any] = {
            "num_blocks": num_blocks, "max_batch_tokens": max_batch_tokens, "max_requests_per_batch": max_active,
            "max_memory_percent": max_memory_percent, "allow_block_sharing": prefix_sharing,
            "per_request_processors": per_request_sampling, "seed": seed, "scheduler_type": "fifo",
            "page_size" if "page_size" in fields else "block_size": block_size}
        config = ContinuousBatchingConfig(**{key: value for key, value in options.items() if value is not None})
        self.model = model
        self._attention = model.config._attn_implementation  # switched to a paged one below, restored in close()
        self.manager = model.init_continuous_batching(generation_config=generation_config,
                                                      continuous_batching_config=config)
        self.manager.warmup()  # builds the batch processor (and captures CUDA graphs where they are on)
        self.processor = self.manager.batch_processor
        self.scheduler = self.processor.scheduler
        self.cache = self.processor.cache
        self.num_blocks = int(self.cache.num_blocks)
        self.block_size = block_size
        #: Sampling parameters a request may set: those whose default made a logits processor (a temperature of
        #: 1.0 or a top_p of 1.0 makes none, so there is nothing to override per request).
        self.per_request_keys = frozenset(self.processor.logit_processor.supported_keys)
        # With asynchronous batching a step returns the previous step's tokens: the first step has none to read.
        self._primed = not self.processor.use_async_batching

    def add(self, request_id: str, prompt: list[int], max_new_tokens: int, eos_token_id: int | list[int] | None,
            sampling: dict[str, Any]) -> None:
        state = RequestState(request_id=request_id, initial_tokens=prompt, max_new_tokens=max_new_tokens,
                             eos_token_id=eos_token_id, logit_processor_kwargs=sampling)
        self.processor.logit_processor.check_kwargs(sampling)
        self.scheduler.add_waiting_request(state)

    def cancel(self, request_id: str) -> None:
        """Drop a sequence that is still scheduled and free its blocks now (no-op for a finished one)."""
        if request_id not in self.scheduler.active_requests and request_id not in self.scheduler.waiting_requests:
            return
        self.scheduler.set_request_cancellation(request_id)
        for state in self.scheduler.clear_cancelled_requests():
            state.status = RequestStatus.FINISHED  # an asynchronous step still in flight skips it

    def step(self) -> list[Progress]:
        """One iteration for every scheduled sequence: ``(request_id, tokens generated so far, finished, error)``
        for each sequence still scheduled and each one that ended in this step."""
        if not self.processor.prepare_next_batch():
            return []
        self.manager._generation_step()
        if self._primed:
            self.processor.update_batch()
        self._primed = True
        progress: list[Progress] = []
        while (output := self.manager.get_result(timeout=0)) is not None:  # finished or failed in this step
            progress.append((output.request_id, output.generated_tokens, True, output.error))
        for request_id, state in self.scheduler.active_requests.items():
            progress.append((request_id, _generated(state), False, None))
        return progress

    def free_fraction(self) -> float:
        """The share of the KV cache not held by any sequence."""
        if hasattr(self.cache, "compute_free_capacity"):
            return float(self.cache.compute_free_capacity())
        return self.cache.get_num_free_blocks() / self.num_blocks

    def close(self) -> None:
        """Free the cache and put the model's attention implementation back."""
        self.manager.batch_processor = None
        self.processor = self.scheduler = self.cache = None
        if self.model.config._attn_implementation != self._attention:
            self.model.set_attn_implementation(self._attention)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _generated(state: RequestState) -> list[int]:
    """The tokens a sequence generated, also after it was put back in the queue to free memory (its tokens so far
    then became part of its prompt, after the first ``_true_initial_tokens``)."""
    prompt = state._true_initial_tokens
    return state.initial_tokens[prompt:] + state.generated_tokens if prompt else state.generated_tokens
