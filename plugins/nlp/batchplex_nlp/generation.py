"""The ``generation`` step adapter: Hugging Face causal LMs under continuous batching, with a paged KV cache.

Run by a batchplex continuous workload (`batchplex.continuous.ContinuousWorkload`): each request is tokenized at
submit, joins the running batch between two steps, and leaves it when it generated ``max_new_tokens`` tokens or an
end-of-sequence token (or when its caller cancelled or its deadline passed).

    workload = ContinuousWorkload("gen", GenerationAdapter(tokenizer), ContinuousPolicy(max_active=64),
                                  model=AutoModelForCausalLM.from_pretrained(path), device="cuda")
    workload.start()
    text = await workload.submit("Once upon a time", max_new_tokens=50)
    async for piece in workload.stream("Once upon a time", max_new_tokens=50): ...

Why batchplex runs its own step loop (`BlockEngine`, ``engine="blocks"``, the default): transformers' continuous
batching (``engine="transformers"``, `PagedEngine`, which steps its batch processor one iteration at a time) builds
every step's cache read indices token by token in Python and a dense query x key mask when flash-attention is not
installed (its ``sdpa``/``eager`` paged paths), so a step's host time grows with the tokens held by all active
sequences. On an H200 (transformers 5.17, 16-layer 1024-wide Llama, bf16, 64 active sequences of up to 756 tokens)
a decode step took ~78 ms and batchplex generated 630 tokens/s through it, against 990 for static batching with
``model.generate``. `BlockEngine` runs the same model with a paged KV cache of its own (a sequence holds blocks of
``block_size`` tokens, allocated as it grows, so memory follows the tokens actually generated rather than
``max_length`` per sequence; a finished or cancelled sequence hands its blocks back at once; when the cache is full
the newest sequence is preempted and recomputed later), builds cache indices and masks with tensor ops on the
device, and replays its decode step from CUDA graphs on GPUs. Its greedy tokens equal ``model.generate``'s, like
transformers' engine's. ``engine="transformers"`` remains, for prefix sharing (``prefix_sharing=True``) and
flash-attention's varlen kernels. What neither engine has for a server, batchplex adds around it: priorities,
deadlines, cancellation, a bounded queue, admission by token budget, streaming to asyncio callers, statistics.

Request parameters (``submit(prompt, **params)``): ``max_new_tokens`` (int >= 1, default the adapter's),
``ignore_eos`` (generate exactly ``max_new_tokens`` tokens), and, when the adapter was configured with
``sampling``, any of its keys (``temperature``, ``top_k``, ``top_p``) to override them for this request (a key whose
default is neutral, a temperature or top_p of 1.0, makes no logits processor and cannot be overridden).

A prompt is a text or token ids (a list of ints, a 1-D integer tensor or array), validated by the ``text``
adapter's encoder: empty, unknown-type, out-of-vocabulary or too-long prompts fail at submit with
`InvalidRequestError` (`RequestTooLargeError` for length: ``prompt + max_new_tokens <= max_length``). ``submit``
returns text for a text prompt and token ids for an ids prompt; ``stream`` yields text pieces or token ids alike.
"""

from __future__ import annotations

import itertools
import math
import sys
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from batchplex import InvalidRequestError, RequestTooLargeError
from batchplex.continuous import ContinuousPolicy, StepAdapter, StepOutput, TokenStreamer
from transformers import GenerationConfig, PreTrainedTokenizerBase

from ._encode import TextEncoder
from ._generation_blocks import BlockEngine
from ._generation_text import TextStreamer

if TYPE_CHECKING:
    from ._generation_paged import PagedEngine

__all__ = ["GenerationAdapter", "GenerationRequest", "SAMPLING"]

#: Sampling parameters, their type and the range a value must be in.
SAMPLING = {"temperature": (float, "a number > 0"), "top_k": (int, "an int >= 1"),
            "top_p": (float, "a number in (0, 1]")}
_DEFAULT_MAX_LENGTH = 4096
_CPU_CACHE_TOKENS = 65536
_ENGINES = ("blocks", "transformers")


@dataclass
class GenerationRequest:
    """One prepared request: prompt ids, its limits and sampling overrides, and whether it answers in text."""

    prompt: list[int]
    max_new_tokens: int
    eos_token_id: int | list[int] | None
    sampling: dict[str, Any] = field(default_factory=dict)
    text: bool = False


class GenerationAdapter(StepAdapter[GenerationRequest]):
    """Generates with a Hugging Face causal LM (``AutoModelForCausalLM``) under continuous batching.

    Options (``adapter_options``):

    * ``tokenizer`` (required): the model's tokenizer; prompts are checked against ``len(tokenizer)``.
    * ``max_new_tokens``: the default of requests that do not say (64).
    * ``max_length``: the most tokens of prompt plus generation of one sequence; default the model's
      ``max_position_embeddings``, at most 4096.
    * ``sampling``: None (greedy decoding, the default) or a dict of ``temperature``/``top_k``/``top_p`` defaults;
      requests may override those keys (but not a neutral temperature or top_p of 1.0). ``seed`` seeds sampling.
    * ``eos_token_id``: ``"auto"`` (the model's generation config, else its config, else the tokenizer's), an id or
      ids, or None (stop on ``max_new_tokens`` only).
    * KV cache: ``cache_tokens`` (its capacity in tokens; default on CUDA: ``max_memory_percent`` (0.5) of the free
      memory, on the CPU: ``max_active * max_length`` capped at 65536), ``block_size`` (tokens per block, 64),
      ``prefix_sharing`` (share the blocks of identical prompt prefixes, ``engine="transformers"`` only; default
      False, so memory figures are exact).
    * ``engine``: ``"blocks"`` (batchplex's step loop, `BlockEngine`; the default) or ``"transformers"``
      (transformers' continuous batching processor, `PagedEngine`); see the module docstring.
    * ``skip_special_tokens``: when decoding text results and streams (True).
    """

    name = "generation"

    def __init__(self, tokenizer: PreTrainedTokenizerBase | None = None, *, max_new_tokens: int = 64,
                 max_length: int | None = None, sampling: Mapping[str, float | int] | None = None,
                 seed: int | None = None, eos_token_id: int | Sequence[int] | str | None = "auto",
                 cache_tokens: int | None = None, block_size: int = 64, max_memory_percent: float = 0.5,
                 prefix_sharing: bool = False, skip_special_tokens: bool = True, engine: str = "blocks") -> None:
        if tokenizer is not None and not isinstance(tokenizer, PreTrainedTokenizerBase):
            raise TypeError(f"generation adapter: tokenizer must be a transformers PreTrainedTokenizerBase, got "
                            f"{type(tokenizer).__name__}")
        for option, value in (("max_new_tokens", max_new_tokens), ("max_length", max_length),
                              ("cache_tokens", cache_tokens), ("block_size", block_size)):
            if value is not None and not _is_int(value, 1):
                raise ValueError(f"generation adapter: {option} must be an int >= 1, got {value!r}")
        if not (isinstance(max_memory_percent, float) and 0 < max_memory_percent <= 1):
            raise ValueError(f"generation adapter: max_memory_percent must be a float in (0, 1], got "
                             f"{max_memory_percent!r}")
        if engine not in _ENGINES:
            raise ValueError(f"generation adapter: engine must be one of {_ENGINES}, got {engine!r}")
        if prefix_sharing and engine != "transformers":
            raise ValueError("generation adapter: prefix_sharing needs engine='transformers'")
        self.tokenizer = tokenizer
        self.max_new_tokens = max_new_tokens
        self.max_length = max_length
        self.sampling = {key: _check_sampling(key, value, ValueError) for key, value in (sampling or {}).items()}
        self.seed = seed
        self.eos_token_id = eos_token_id
        self.cache_tokens = cache_tokens
        self.block_size = block_size
        self.max_memory_percent = max_memory_percent
        self.prefix_sharing = prefix_sharing
        self.skip_special_tokens = skip_special_tokens
        self.engine = engine
        self._encoder: TextEncoder | None = None
        self._engine: BlockEngine | PagedEngine | None = None
        self._sent: dict[str, int] = {}  # request id -> tokens already reported
        self._ids = itertools.count()

    def configure(self, **options: Any) -> GenerationAdapter:
        if options.get("tokenizer") is None:
            raise TypeError("the generation adapter needs a tokenizer: adapter_options={'tokenizer': "
                            "AutoTokenizer.from_pretrained(path), ...}")
        return type(self)(**options)

    # ------------------------------------------------------------------ submit (caller's thread)
    def prepare(self, item: Any, **params: Any) -> GenerationRequest:
        """Tokenize and check one prompt and its parameters; bad input raises `InvalidRequestError`."""
        if self._engine is None:
            raise RuntimeError("the generation adapter checks prompts against its model: start its workload first")
        overridable = self._engine.per_request_keys
        unknown = sorted(set(params) - {"max_new_tokens", "ignore_eos", *overridable})
        if unknown:
            hint = ("a request may set only the sampling parameters of adapter_options sampling={...} whose default "
                    "is not neutral (temperature != 1.0, top_p < 1.0)" if set(unknown) & set(SAMPLING) else
                    f"known: max_new_tokens, ignore_eos, {sorted(overridable)}")
            raise InvalidRequestError(f"unknown generation parameters {unknown} ({hint})",
                                      rule="known parameters", value=unknown)
        max_new_tokens = params.get("max_new_tokens", self.max_new_tokens)
        if not _is_int(max_new_tokens, 1):
            raise InvalidRequestError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}",
                                      rule="max_new_tokens >= 1", value=max_new_tokens)
        ignore_eos = params.get("ignore_eos", False)
        if not isinstance(ignore_eos, bool):
            raise InvalidRequestError(f"ignore_eos must be True or False, got {ignore_eos!r}", rule="ignore_eos",
                                      value=ignore_eos)
        sampling = {key: _check_sampling(key, params[key], InvalidRequestError) for key in overridable
                    if key in params}
        if isinstance(item, (list, tuple)) and item and all(isinstance(part, str) for part in item):
            raise InvalidRequestError("a prompt is a text or token ids, not a list of texts",
                                      rule="text or token ids", value=type(item).__name__)
        prompt = self._encoder.encode(item).ids.tolist()
        if len(prompt) + max_new_tokens > self._max_length:
            raise RequestTooLargeError(
                f"the prompt has {len(prompt)} tokens and asks for {max_new_tokens} more, past max_length="
                f"{self._max_length}; shorten it or ask for fewer tokens", rule="prompt + max_new_tokens <= "
                "max_length", value=len(prompt) + max_new_tokens)
        return GenerationRequest(prompt, max_new_tokens, None if ignore_eos else self._eos, sampling,
                                 text=isinstance(item, str))

    def cost(self, prepared: GenerationRequest) -> int:
        """The prompt's tokens: what the request adds to the step that admits it."""
        return len(prepared.prompt)

    # ------------------------------------------------------------------ the step thread
    def start(self, model: torch.nn.Module, device: torch.device, policy: ContinuousPolicy) -> None:
        """Move ``model`` to ``device``; size and allocate the paged KV cache for ``policy``."""
        if self.tokenizer is None:
            raise TypeError("the generation adapter needs a tokenizer (adapter_options={'tokenizer': ...})")
        model = model.to(device).eval()
        config = model.config.get_text_config()
        if config.vocab_size < len(self.tokenizer):
            raise ValueError(f"generation adapter: the tokenizer has {len(self.tokenizer)} tokens but the model's "
                             f"vocabulary only {config.vocab_size}")
        limit = getattr(config, "max_position_embeddings", None) or _DEFAULT_MAX_LENGTH
        self._max_length = self.max_length or min(limit, _DEFAULT_MAX_LENGTH)
        # The encoder checks type, emptiness and vocabulary; prepare() checks the length (prompt + new tokens).
        self._encoder = TextEncoder(self.tokenizer, sys.maxsize, truncate=False, allow_empty=False)
        self._eos = _resolve_eos(self.eos_token_id, model, self.tokenizer)
        cache_tokens = self.cache_tokens
        if cache_tokens is None and device.type == "cpu":
            cache_tokens = min(policy.max_active * self._max_length, _CPU_CACHE_TOKENS)
        generation_config = GenerationConfig(do_sample=bool(self.sampling), max_new_tokens=self.max_new_tokens,
                                             eos_token_id=-1 if self._eos is None else self._eos,
                                             pad_token_id=self.tokenizer.pad_token_id,
                                             **self.sampling)
        options = {"max_active": policy.max_active, "max_batch_tokens": policy.max_batch_tokens,
                   "num_blocks": None if cache_tokens is None else math.ceil(cache_tokens / self.block_size),
                   "block_size": self.block_size, "max_memory_percent": self.max_memory_percent,
                   "per_request_sampling": bool(self.sampling), "seed": self.seed}
        with torch.inference_mode():
            if self.engine == "blocks":
                self._engine = BlockEngine(model, generation_config, max_length=self._max_length, **options)
            else:
                self._engine = _paged_engine()(model, generation_config, prefix_sharing=self.prefix_sharing,
                                               **options)
        capacity = self._engine.num_blocks * self.block_size
        if capacity < self._max_length:
            self.close()
            raise ValueError(f"generation adapter: the KV cache holds {capacity} tokens, fewer than one sequence "
                             f"of max_length={self._max_length}; raise cache_tokens or lower max_length")

    def admit(self, prepared: GenerationRequest) -> Hashable:
        request_id = str(next(self._ids))
        self._engine.add(request_id, prepared.prompt, prepared.max_new_tokens, prepared.eos_token_id,
                         prepared.sampling)
        self._sent[request_id] = 0
        return request_id

    def step(self) -> list[StepOutput]:
        with torch.inference_mode():
            progress = self._engine.step()
        results = []
        for request_id, tokens, finished, error in progress:
            sent = self._sent.get(request_id)
            if sent is None or (len(tokens) == sent and not finished):  # released meanwhile, or nothing new
                continue
            self._sent[request_id] = len(tokens)
            results.append(StepOutput(request_id, tokens[sent:], finished, error))
        return results

    def release(self, handle: Hashable) -> None:
        del self._sent[handle]
        self._engine.cancel(handle)

    def close(self) -> None:
        if self._engine is not None:
            self._engine.close()
            self._engine = None
        self._sent.clear()

    def memory(self) -> dict[str, Any]:
        """``kv_free``: the free share of the KV cache; its blocks, those in use, their size; sequences admitted."""
        engine = self._engine
        if engine is None:
            return {}
        free = engine.free_fraction()
        blocks = engine.num_blocks
        return {"kv_free": free, "kv_blocks": blocks, "kv_blocks_used": round((1 - free) * blocks),
                "block_size": engine.block_size, "sequences": len(self._sent)}

    # ------------------------------------------------------------------ results (event loop)
    def result(self, prepared: GenerationRequest, tokens: list[int]) -> str | list[int]:
        """Text for a text prompt (special tokens skipped by option), else the generated token ids."""
        if prepared.text:
            return self.tokenizer.decode(tokens, skip_special_tokens=self.skip_special_tokens)
        return list(tokens)

    def streamer(self, prepared: GenerationRequest) -> TokenStreamer:
        return TextStreamer(self.tokenizer, self.skip_special_tokens) if prepared.text else TokenStreamer()


def _paged_engine() -> type[PagedEngine]:
    try:  # imported here, so that the plugin (and its other adapters) loads with any transformers version
        from ._generation_paged import PagedEngine
    except ImportError as error:
        raise ImportError(f"the generation adapter's engine='transformers' needs transformers' continuous batching "
                          f"(transformers >= 5.17): {error}") from error
    return PagedEngine


def _resolve_eos(option: int | Sequence[int] | str | None, model: torch.nn.Module,
                 tokenizer: PreTrainedTokenizerBase) -> int | list[int] | None:
    if option != "auto":
        return option if option is None or isinstance(option, int) else list(option)
    generation = getattr(model, "generation_config", None)
    for candidate in (getattr(generation, "eos_token_id", None), model.config.get_text_config().eos_token_id,
                      tokenizer.eos_token_id):
        if candidate is not None:
            return candidate
    return None


def _check_sampling(key: str, value: Any, error: type[Exception]) -> float | int:
    """A valid sampling value (ints are accepted for float parameters), else ``error`` naming the rule."""
    if key not in SAMPLING:
        raise error(f"unknown sampling parameter {key!r}; known: {sorted(SAMPLING)}")
    kind, expected = SAMPLING[key]
    ok = _is_int(value, 1) if kind is int else (
        isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0
        and (key != "top_p" or value <= 1))
    if not ok:
        message = f"{key} must be {expected}, got {value!r}"
        if error is InvalidRequestError:
            raise InvalidRequestError(message, rule=f"{key}: {expected}", value=value)
        raise error(f"generation adapter: sampling {message}")
    return kind(value)


def _is_int(value: Any, minimum: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum
