"""The ``text`` adapter: encoder models (BERT, MiniLM, RoBERTa, ...) over texts, text pairs or token ids.

A request is tokenized once at submit, without padding (`TextEncoder`); its cost is its token count, so the
core's ``bucket_edges`` and ``max_batch_cost`` count tokens. With ``tokenize="collate"`` texts are tokenized per
batch instead, on the executor's collate thread, in one call the tokenizer runs on all its threads. A batch is
padded to its longest member rounded up to ``pad_to_multiple_of`` (tensor cores like multiples of 8), in one
pinned host buffer moved with one copy (`pad_batch`). The model gets one dict: wrap a Hugging Face model in
`HFModel` so it is called as ``model(**batch)``. What comes back per request depends on ``output``; reductions
run on the device in ``postprocess`` so only the reduced tensor is copied back.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from batchplex import Adapter, InvalidRequestError
from batchplex.collate import split_rows
from transformers import PreTrainedTokenizerBase

from ._encode import Encoded, TextEncoder
from ._padding import pad_batch, padded_length, real_starts

__all__ = ["TextAdapter", "OUTPUTS"]

#: What one request's result is, by ``output`` option.
OUTPUTS = {
    "hidden_states": "the last hidden states of the request's own tokens, (length, hidden): padding cut off",
    "mean_pooling": "the mean of the last hidden states over the request's real tokens (mask-aware, computed on "
                    "the device), (hidden,): a sentence embedding",
    "cls": "the last hidden state of the request's first token ([CLS] for BERT-like tokenizers), (hidden,)",
    "logits": "the model's logits: (labels,) for sequence classification, (length, labels) with padding cut off "
              "for token classification",
    "raw": "the model's output as it is, split by rows (padded positions kept: a row of per-token tensors is "
           "padded to the batch's length)",
}
_DEFAULT_MAX_LENGTH = 512


class TextAdapter(Adapter[Encoded]):
    """Batches text requests for an encoder model.

    Options (``adapter_options`` of ``add_workload``):

    * ``tokenizer`` (required): any ``PreTrainedTokenizerBase``. A fast tokenizer is used through a private copy
      of its backend (the caller's tokenizer object is never reconfigured).
    * ``max_length``: the most tokens a request may have, special tokens included; default the tokenizer's
      ``model_max_length`` capped at 512.
    * ``overflow``: ``"truncate"`` (default; the tokenizer's ``longest_first`` strategy on its
      ``truncation_side``) or ``"reject"`` (`RequestTooLargeError` at submit naming the length and
      ``max_length``). Pre-tokenized ids are cut to their first (or, for ``truncation_side="left"``, last)
      ``max_length`` ids: a special token at the cut-off end is lost.
    * ``padding_side``: ``"right"`` (default) or ``"left"``. With left padding the batch also carries
      ``position_ids`` (0 at each request's first real token), so absolute position embeddings see every request
      as they would alone; ``position_ids`` (True/False) overrides that choice. RoBERTa-family models offset their
      positions by ``padding_idx + 1`` and derive them from the pad ids themselves: use right padding there.
    * ``pad_to_multiple_of``: round each batch's padded length up to this (default 8), never past ``max_length``.
    * ``output``: one of `OUTPUTS` (default ``"mean_pooling"``).
    * ``results_on_device``: keep results on the model's device instead of copying them to host memory.
    * ``tokenize``: ``"submit"`` (default: each text is tokenized when it is submitted, on the caller's thread, so
      its exact token count is its cost) or ``"collate"`` (each batch's texts are tokenized together on the
      collate thread: one ``encode_batch`` call spread over the tokenizer's threads without the GIL, instead of one
      call per request on the event loop; a text's cost is then an estimate from its words, at most
      ``max_length``, so length buckets and token budgets are approximate: let the last bucket edge reach
      ``max_length``, or an estimate above it is refused at submit). ``"collate"`` needs a fast tokenizer and
      ``overflow="truncate"`` (a text is not tokenized before it is accepted, so it cannot be refused for its
      real length). Token ids are checked at submit either way.
    * ``allow_empty``: accept empty or whitespace-only texts (default False: they are refused at submit with
      ``rule="non-empty text"``; a text that tokenizes to nothing but special tokens is otherwise a valid
      request). A request with no token at all is always refused.

    A request is a ``str``, a ``(str, str)`` pair (``token_type_ids`` come from the tokenizer where it makes
    them), or token ids: a list of ints or a 1-D integer tensor/array, special tokens included, each checked
    against the tokenizer's vocabulary (``len(tokenizer)``). Anything else is refused at submit.

    Padding uses the tokenizer's pad token; a tokenizer without one pads with its EOS token, else with id 0.
    Padded positions are masked out of attention and pooling, so their id never changes a request's result.
    """

    name = "text"
    graph_postprocess = True  # pooling reads only the output and the attention mask

    def __init__(self, tokenizer: PreTrainedTokenizerBase | None = None, *, max_length: int | None = None,
                 overflow: str = "truncate", padding_side: str = "right", pad_to_multiple_of: int = 8,
                 output: str = "mean_pooling", results_on_device: bool = False, allow_empty: bool = False,
                 position_ids: bool | None = None, tokenize: str = "submit") -> None:
        _check_choice("overflow", overflow, ("truncate", "reject"))
        _check_choice("tokenize", tokenize, ("submit", "collate"))
        _check_choice("padding_side", padding_side, ("right", "left"))
        _check_choice("output", output, tuple(OUTPUTS))
        _check_int("pad_to_multiple_of", pad_to_multiple_of)
        for option, value in (("results_on_device", results_on_device), ("allow_empty", allow_empty)):
            if not isinstance(value, bool):
                raise TypeError(f"text adapter: {option} must be True or False, got {value!r}")
        if position_ids is not None and not isinstance(position_ids, bool):
            raise TypeError(f"text adapter: position_ids must be None, True or False, got {position_ids!r}")
        self.overflow = overflow
        self.left = padding_side == "left"
        self.pad_to_multiple_of = pad_to_multiple_of
        self.output = output
        self.copy_output_to_host = not results_on_device
        self.position_ids = self.left if position_ids is None else position_ids
        self.tokenize_at_collate = tokenize == "collate"
        self.tokenizer = tokenizer
        if tokenizer is None:  # the registered prototype; configure() insists on a tokenizer
            self.max_length = max_length or _DEFAULT_MAX_LENGTH
            self._encoder: TextEncoder | None = None
            return
        if not isinstance(tokenizer, PreTrainedTokenizerBase):
            raise TypeError(f"text adapter: tokenizer must be a transformers PreTrainedTokenizerBase (e.g. from "
                            f"AutoTokenizer.from_pretrained), got {type(tokenizer).__name__}")
        if max_length is None:
            max_length = min(int(tokenizer.model_max_length), _DEFAULT_MAX_LENGTH)
        _check_int("max_length", max_length)
        self.max_length = max_length
        self.pad_id = next((token_id for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id)
                            if token_id is not None), 0)
        self._encoder = TextEncoder(tokenizer, max_length, overflow == "truncate", allow_empty)
        if self.tokenize_at_collate and not self._encoder.can_defer:
            raise ValueError(f"text adapter: tokenize='collate' needs a fast tokenizer and overflow='truncate'; "
                             f"got {type(tokenizer).__name__} with overflow={overflow!r}")
        self._prepare = self._encoder.defer if self.tokenize_at_collate else self._encoder.encode

    def configure(self, **options: Any) -> TextAdapter:
        if options.get("tokenizer") is None:
            raise TypeError("the text adapter needs a tokenizer: add_workload(..., adapter='text', "
                            "adapter_options={'tokenizer': AutoTokenizer.from_pretrained(path), ...})")
        return type(self)(**options)

    # ------------------------------------------------------------------ submit
    def prepare(self, item: Any, **params: Any) -> Encoded:
        """Tokenize one request (no padding); bad input raises `InvalidRequestError` for this caller only."""
        if params:
            raise InvalidRequestError(f"the text adapter takes no request parameters, got {sorted(params)}",
                                      rule="no parameters", value=sorted(params))
        if self._encoder is None:
            raise TypeError("this text adapter has no tokenizer; build it with TextAdapter(tokenizer=...) or "
                            "add_workload(..., adapter_options={'tokenizer': ...})")
        return self._prepare(item)

    def cost(self, prepared: Encoded) -> int:
        """The request's token count (special tokens included; estimated for a text left to its batch)."""
        return prepared.length

    def padded_cost(self, costs: Sequence[int], batch_size: int) -> int:
        """Tokens the model really runs on: every row padded to the batch's padded length."""
        return batch_size * self._padded_length(max(costs))

    def _padded_length(self, longest: int) -> int:
        return padded_length(longest, self.pad_to_multiple_of, self.max_length)

    # ------------------------------------------------------------------ device executor
    def collate(self, items: Sequence[Encoded], device: torch.device, batch_size: int) -> dict[str, torch.Tensor]:
        """``input_ids``, ``attention_mask`` (1 on real tokens), ``token_type_ids`` where the tokenizer makes
        them and ``position_ids`` with left padding: int64 tensors of shape (batch_size, padded length)."""
        if self.tokenize_at_collate:  # no pass over the batch when every request was tokenized at submit
            self._encoder.complete(items)
        length = self._padded_length(max(item.length for item in items))
        return pad_batch(items, rows=batch_size, length=length, pad_id=self.pad_id, left=self.left,
                         type_ids=self._encoder.makes_type_ids, position_ids=self.position_ids, device=device)

    def postprocess(self, output: Any, inputs: Mapping[str, torch.Tensor], items: Sequence[Encoded]) -> Any:
        """On the device: pool or pick the one tensor ``output`` asks for, so only it is copied back."""
        if self.output == "raw":
            return output
        if self.output == "logits":
            return _field(output, "logits")
        hidden = _field(output, "last_hidden_state")
        if self.output == "hidden_states":
            return hidden
        mask = inputs["attention_mask"]
        if self.output == "cls":
            first = mask.argmax(dim=1)  # the first real token, for either padding side
            return hidden[torch.arange(hidden.shape[0], device=hidden.device), first]
        weights = mask.unsqueeze(1).to(hidden.dtype)  # (batch, 1, length)
        counts = weights.sum(dim=2).clamp_(min=1)  # = mask.sum() in hidden's dtype: the ones add up in float32
        return torch.bmm(weights, hidden).squeeze(1).div_(counts)

    def split(self, output: Any, items: Sequence[Encoded]) -> list[Any]:
        """One result per request, without padding rows or padded positions: views of ``output``, one ``unbind``
        for all rows, then a slice only of the rows that have padded positions."""
        per_token = self.output == "hidden_states" or (self.output == "logits" and output.dim() == 3)
        if not per_token:
            return split_rows(output, len(items))
        padded = output.shape[1]
        starts = real_starts(items, padded, self.left)
        return [row if item.length == padded else row[start:start + item.length]
                for row, start, item in zip(split_rows(output, len(items)), starts, items)]


def _field(output: Any, name: str) -> torch.Tensor:
    """``name`` from a model output: the tensor itself, a ``ModelOutput``/dict entry, or a tuple's first item."""
    if isinstance(output, torch.Tensor):
        return output
    value = output.get(name) if isinstance(output, Mapping) else getattr(output, name, None)
    if value is None and isinstance(output, (tuple, list)) and output:
        value = output[0]
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"text adapter: the model's output ({type(output).__name__}) has no tensor {name!r}; "
                        f"return a tensor, a tuple whose first item is it, or an object with .{name}")
    return value


def _check_choice(option: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"text adapter: {option} must be one of {', '.join(map(repr, choices))}; got {value!r}")


def _check_int(option: str, value: object) -> None:
    if not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
        raise ValueError(f"text adapter: {option} must be an int >= 1, got {value!r}")
