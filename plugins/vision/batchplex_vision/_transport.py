"""Getting a batch of prepared images onto the device in as few bytes and copies as possible.

Both adapters collate with these helpers, on the device executor's collate thread. A batch travels as ``uint8``
when every image in it is ``uint8`` (4x fewer bytes than float32), staged in one pinned host buffer and moved with
one ``non_blocking`` copy; the conversion to float happens on the device. A batch that holds a float image
travels as float32: its ``uint8`` images are scaled to [0, 1] on the host first (`unify`), so one batch is one
dtype and one copy.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from batchplex.collate import host_buffer, to_device

__all__ = ["UINT8_SCALE", "unify", "value_scale", "cat_to_device"]

#: What a uint8 pixel is divided by to land in [0, 1].
UINT8_SCALE = 255.0


def unify(items: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The batch in one transport dtype: unchanged when all ``uint8``, else float32 with ``uint8`` images scaled."""
    if all(item.dtype == torch.uint8 for item in items):
        return list(items)
    return [item if item.is_floating_point() else torch.div(item, UINT8_SCALE) for item in items]


def value_scale(dtype: torch.dtype) -> float:
    """The full-scale value of a transported batch: 255 for uint8, 1 for float images in [0, 1]."""
    return UINT8_SCALE if dtype == torch.uint8 else 1.0


def cat_to_device(tensors: Sequence[torch.Tensor], device: torch.device) -> torch.Tensor:
    """Flatten and concatenate same-dtype tensors into one (pinned) host buffer and move it in one copy.

    The result is 1-dim; cut it back with ``torch.split`` by each tensor's ``numel()``.
    """
    staged = host_buffer((sum(t.numel() for t in tensors),), tensors[0].dtype, device)
    torch.cat([t.reshape(-1) for t in tensors], out=staged)
    return to_device(staged, device)
