"""One image request to one CHW tensor: the accepted types, the layout rules and the checks that refuse bad input.

Called from the adapters' ``prepare``, at submit, on the caller's thread, so a bad image fails for its caller only.

Accepted requests:

* a ``torch.Tensor`` (CPU or not; it is moved to the CPU) of dtype ``uint8`` or any floating dtype;
* a ``numpy.ndarray`` of dtype ``uint8`` or ``float16/32/64``;
* a ``PIL.Image.Image`` with 8 bits per band (modes such as ``L``, ``RGB``, ``RGBA``); its band count is its
  channel count, and it is always read as HWC.

Layout rules for tensors and arrays, with ``C`` the workload's configured channel count (``channels=3``):

* rank 3 with ``layout="auto"``: the axis of length ``C`` is the channel axis. ``(C, H, W)`` with ``W != C`` is
  CHW; ``(H, W, C)`` with ``H != C`` is HWC. A shape with ``C`` both first and last (e.g. ``(3, 8, 3)``) is
  ambiguous and refused: set ``layout="CHW"`` or ``"HWC"``. A shape with ``C`` at neither end is refused as a
  wrong channel count. ``layout="CHW"``/``"HWC"`` skips the guess and only checks the channel axis.
* rank 2 ``(H, W)``: one channel, accepted only when ``C == 1``.
* any other rank (a batch ``(N, C, H, W)`` included) is refused: one request is one image.

Values: ``uint8`` images are kept as ``uint8`` (the fast path: 1 byte per value over PCIe, converted on the device).
Floating images must hold finite values in ``[0, 1]`` (``FLOAT_SLACK`` allowed either side for rounding); they
are kept as ``float32``. Float images scaled to ``[0, 255]`` are refused, since the mistake would otherwise pass
silently through normalization.

The result is contiguous. A request that is already a contiguous CHW CPU tensor of ``uint8`` or ``float32`` is not
copied: leave it unchanged until its result is back.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from batchplex import InvalidRequestError
from batchplex.collate import on_host
from PIL import Image

__all__ = ["LAYOUTS", "FLOAT_SLACK", "to_chw", "check_layout"]

LAYOUTS = ("auto", "CHW", "HWC")
#: How far outside [0, 1] a float pixel may lie (rounding in the caller's own preprocessing).
FLOAT_SLACK = 1e-3

_NUMPY_FLOATS = (np.float16, np.float32, np.float64)


def check_layout(layout: str) -> str:
    """Validate the ``layout`` adapter option (at configure time)."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    return layout


def to_chw(item: Any, channels: int, layout: str = "auto") -> torch.Tensor:
    """The request as a contiguous CHW tensor: ``uint8`` as ``uint8``, floating point as ``float32`` in [0, 1].

    Raises `InvalidRequestError` naming the rule and the value when the request breaks a rule above.
    """
    if isinstance(item, Image.Image):
        tensor, layout = _from_pil(item, channels), "HWC"
    elif isinstance(item, np.ndarray):
        tensor = _from_numpy(item)
    elif isinstance(item, torch.Tensor):
        tensor = on_host(item)
    else:
        raise InvalidRequestError(
            f"an image request must be a torch.Tensor, numpy.ndarray or PIL.Image.Image, got "
            f"{type(item).__module__}.{type(item).__qualname__}", rule="image type", value=type(item))
    if not (tensor.dtype == torch.uint8 or tensor.is_floating_point()):
        raise InvalidRequestError(f"image pixels must be uint8 or floating point, got {tensor.dtype}",
                                  rule="pixel dtype", value=tensor.dtype)
    chw = _chw_view(tensor, channels, layout)
    if chw.is_floating_point():
        _check_float_values(chw)
        chw = chw.to(torch.float32)
    return chw.contiguous()


def _from_pil(image: Image.Image, channels: int) -> torch.Tensor:
    bands = image.getbands()
    if len(bands) != channels:
        raise InvalidRequestError(
            f"PIL image of mode {image.mode!r} has {len(bands)} channel(s), the workload expects {channels}; "
            f"convert it first (image.convert({'RGB' if channels == 3 else 'L'!r}))",
            rule="channel count", value=image.mode)
    array = np.array(image)
    if array.dtype != np.uint8:
        raise InvalidRequestError(f"PIL image of mode {image.mode!r} is not 8 bits per channel; convert it to "
                                  f"'L', 'RGB' or 'RGBA' first", rule="pixel dtype", value=image.mode)
    tensor = torch.from_numpy(array)
    return tensor.unsqueeze(-1) if tensor.dim() == 2 else tensor


def _from_numpy(array: np.ndarray) -> torch.Tensor:
    if array.dtype != np.uint8 and array.dtype.type not in _NUMPY_FLOATS:
        raise InvalidRequestError(f"numpy image pixels must be uint8 or float16/32/64, got {array.dtype}",
                                  rule="pixel dtype", value=array.dtype)
    if not array.flags.writeable or any(stride < 0 for stride in array.strides):
        array = np.array(array)  # torch.from_numpy warns on read-only arrays and refuses negative strides
    return torch.from_numpy(array)


def _chw_view(tensor: torch.Tensor, channels: int, layout: str) -> torch.Tensor:
    shape = tuple(tensor.shape)
    if tensor.dim() == 2:
        if channels != 1:
            raise InvalidRequestError(
                f"a 2-dim (H, W) image of shape {shape} has 1 channel, the workload expects {channels} "
                f"(give a {channels}-channel image or set channels=1)", rule="channel count", value=shape)
        tensor = tensor.unsqueeze(0)
        layout = "CHW"
    elif tensor.dim() != 3:
        raise InvalidRequestError(
            f"an image must have rank 3 (CHW or HWC) or rank 2 (H, W); got rank {tensor.dim()}, shape {shape} "
            f"(submit one image per request)", rule="rank", value=shape)
    if tensor.numel() == 0:
        raise InvalidRequestError(f"the image is empty: shape {shape}", rule="non-empty", value=shape)
    if layout == "auto":
        layout = _guess_layout(tuple(tensor.shape), channels, shape)
    channel_axis = 0 if layout == "CHW" else 2
    if tensor.shape[channel_axis] != channels:
        raise InvalidRequestError(
            f"{layout} image of shape {shape} has {tensor.shape[channel_axis]} channel(s), the workload expects "
            f"{channels}", rule="channel count", value=shape)
    return tensor if layout == "CHW" else tensor.permute(2, 0, 1)


def _guess_layout(shape: tuple[int, ...], channels: int, original: tuple[int, ...]) -> str:
    first, last = shape[0] == channels, shape[2] == channels
    if first and last:
        raise InvalidRequestError(
            f"image shape {original} reads as CHW and as HWC with {channels} channels; set the adapter option "
            f"layout='CHW' or layout='HWC'", rule="unambiguous layout", value=original)
    if not (first or last):
        raise InvalidRequestError(
            f"image shape {original} has {shape[0]} channel(s) if CHW, {shape[2]} if HWC; the workload expects "
            f"{channels}", rule="channel count", value=original)
    return "CHW" if first else "HWC"


def _check_float_values(chw: torch.Tensor) -> None:
    low, high = (float(v) for v in torch.aminmax(chw))
    if not (math.isfinite(low) and math.isfinite(high)):
        bad = low if not math.isfinite(low) else high
        raise InvalidRequestError(f"float image holds NaN or infinite pixels (found {bad})",
                                  rule="finite values", value=bad)
    if low < -FLOAT_SLACK or high > 1 + FLOAT_SLACK:
        raise InvalidRequestError(
            f"float image pixels must lie in [0, 1], found [{low:g}, {high:g}]; scale them to [0, 1] or send "
            f"uint8 (0-255)", rule="float range [0, 1]", value=(low, high))
