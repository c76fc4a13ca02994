"""JSON in and out of the HTTP routes: how a request body becomes an item, and a result becomes JSON.

A request body is ``{"item": ..., "params": {...}, "priority": 0, "timeout": 1.5}`` (only ``item`` is required).
``item`` is passed to the workload's adapter as it is (a text, a text pair, token ids), except for two tensor forms:

* ``{"tensor": <nested lists>, "dtype": "uint8"}``: a tensor from nested lists (``dtype`` optional, default
  inferred by torch);
* ``{"base64": "<bytes>", "shape": [32, 32, 3], "dtype": "uint8"}``: raw bytes in C order, e.g. an HWC uint8
  image (``dtype`` default ``uint8``); 4x smaller than nested lists for images.

Results: tensors and numpy arrays become nested lists; dicts, lists and tuples are converted member by member.
Handle callers get results as they are, after `compact_result`.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from batchplex import InvalidRequestError
from batchplex.collate import map_tensors

__all__ = ["compact_result", "decode_item", "encode_image", "encode_result"]


def decode_item(item: Any) -> Any:
    """The adapter's input for one JSON ``item`` (see the module docstring); malformed forms raise
    `InvalidRequestError` naming the rule and the value."""
    if not isinstance(item, Mapping):
        return item
    dtype = item.get("dtype")
    if "tensor" in item:
        torch_dtype = _torch_dtype(dtype) if dtype else None
        try:
            return torch.tensor(item["tensor"], dtype=torch_dtype)
        except (TypeError, ValueError, RuntimeError) as error:
            raise InvalidRequestError(f"'tensor' must be rectangular nested lists of numbers: {error}",
                                      rule="tensor from nested lists", value=_short(item["tensor"])) from None
    if "base64" in item:
        try:
            raw = base64.b64decode(item["base64"], validate=True)
            shape = tuple(int(n) for n in item["shape"])
            array = np.frombuffer(raw, dtype=np.dtype(dtype or "uint8")).reshape(shape)
        except (KeyError, TypeError, ValueError, binascii.Error) as error:
            raise InvalidRequestError(f"'base64' needs valid base64 bytes and a 'shape' that matches them: {error}",
                                      rule="base64 bytes with shape", value=_short(item)) from None
        return torch.from_numpy(array.copy())
    return item


def encode_image(image: torch.Tensor | np.ndarray) -> dict[str, Any]:
    """The compact JSON form of one tensor or array (what a client sends for an image)."""
    array = image.numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    array = np.ascontiguousarray(array)
    return {"base64": base64.b64encode(array.tobytes()).decode("ascii"), "shape": list(array.shape),
            "dtype": str(array.dtype)}


def encode_result(result: Any) -> Any:
    """A JSON-serialisable form of one request's result."""
    if isinstance(result, torch.Tensor):
        return result.detach().cpu().tolist()
    if isinstance(result, np.ndarray):
        return result.tolist()
    if isinstance(result, Mapping):
        return {str(key): encode_result(value) for key, value in result.items()}
    if isinstance(result, (list, tuple)):
        return [encode_result(value) for value in result]
    return result


def compact_result(result: Any) -> Any:
    """``result`` with every tensor that is a view into a larger storage copied into one of its own.

    Adapters split a batch's output into per-request views (no copy per row), and pickling a view writes its whole
    storage: a ResNet's one row of logits would travel back to its Ray caller with the 63 other rows of its batch
    (128 KB instead of 2 KB at batch 64, fp16). A view is copied into its own elements (an expanded view into the
    distinct elements it reads, strides kept); tensors that own their storage, and sparse or nested ones, pass
    through.
    """
    return map_tensors(_own_storage, result)


def _own_storage(tensor: torch.Tensor) -> torch.Tensor:
    if tensor.layout is not torch.strided or tensor.is_nested:
        return tensor
    if tensor.numel() == 0:
        return tensor.clone()
    reach = 1 + sum((size - 1) * stride for size, stride in zip(tensor.shape, tensor.stride()))
    if tensor.untyped_storage().nbytes() <= reach * tensor.element_size():
        return tensor
    if reach < tensor.numel():  # an expanded view: copy its distinct elements and keep its strides
        own = tensor.as_strided((reach,), (1,), tensor.storage_offset()).clone()
        return own.as_strided(tensor.shape, tensor.stride())
    return tensor.clone()


def _torch_dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype):
        raise InvalidRequestError(f"unknown dtype {name!r}; use a torch dtype name such as 'uint8' or 'float32'",
                                  rule="dtype name", value=name)
    return dtype


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
