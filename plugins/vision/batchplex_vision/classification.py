"""The ``image`` adapter: fixed-size images stacked into one normalized batch tensor on the device.

At submit (`prepare`) each image is checked and made a contiguous CHW tensor of the configured size, resized on
the CPU when ``resize=True``. At collate the batch is stacked into one pinned host buffer, still ``uint8`` when
every image is (see `batchplex_vision._transport`), copied once, and turned into the model's input on the device
by one fused kernel: ``x * gain + shift`` with ``gain = 1 / (scale * std)`` and ``shift = -mean / std``, written
straight into a tensor of the model's dtype and memory format. The output is split back one row per request.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from batchplex import InvalidRequestError
from batchplex.collate import split_rows, stack_to_device
from torchvision.transforms.v2 import functional as TF

from ._base import ImageRequests
from ._transport import unify, value_scale

__all__ = ["ImageAdapter", "IMAGENET_MEAN", "IMAGENET_STD"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_MODEL_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class ImageAdapter(ImageRequests):
    """Fixed-size image requests batched into one ``(N, C, H, W)`` tensor, normalized on the device.

    Options: ``size`` (``(H, W)`` or one int for a square); ``mean``/``std`` per channel in [0, 1] units
    (ImageNet's for 3 channels when left out; ``mean=(0, 0, 0), std=(1, 1, 1)`` gives plain [0, 1] input);
    ``resize`` (False: an image of another size is refused at submit; True: it is resized to ``size`` at submit, on
    the CPU, bilinear with antialiasing, aspect ratio not kept); ``channels_last``; ``dtype`` of the model input
    (float32, float16, bfloat16; a ``torch.dtype`` or its name); ``channels``, ``layout`` and
    ``results_on_device`` as in `ImageRequests`.
    """

    name = "image"

    def __init__(self, size: int | Sequence[int] = (224, 224), mean: Sequence[float] | None = None,
                 std: Sequence[float] | None = None, resize: bool = False, channels_last: bool = False,
                 dtype: torch.dtype | str = torch.float32, *, channels: int = 3, layout: str = "auto",
                 results_on_device: bool = False) -> None:
        super().__init__(channels=channels, layout=layout, results_on_device=results_on_device)
        self.size = _size(size)
        self.mean = _per_channel("mean", mean, IMAGENET_MEAN, channels)
        self.std = _per_channel("std", std, IMAGENET_STD, channels)
        if any(s <= 0 for s in self.std):
            raise ValueError(f"image adapter: std values must be > 0, got {self.std}")
        self.resize = bool(resize)
        self.channels_last = bool(channels_last)
        self.dtype = _model_dtype(dtype)
        self._constants: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}

    def prepare(self, item: Any, **params: Any) -> torch.Tensor:
        image = self.image(item, params)
        size = tuple(image.shape[1:])
        if size == self.size:
            return image
        if not self.resize:
            raise InvalidRequestError(
                f"image size {size[0]}x{size[1]} (HxW) differs from the workload's {self.size[0]}x{self.size[1]}; "
                f"resize it first or set the adapter option resize=True", rule="image size", value=size)
        return TF.resize(image, list(self.size), interpolation=TF.InterpolationMode.BILINEAR,
                         antialias=True).contiguous()

    def collate(self, items: Sequence[torch.Tensor], device: torch.device, batch_size: int) -> torch.Tensor:
        batch = stack_to_device(unify(items), device, batch_size)
        gain, shift = self._normalization(device, batch.dtype)
        memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        out = torch.empty(batch.shape, dtype=self.dtype, device=device, memory_format=memory_format)
        return torch.addcmul(shift, batch, gain, out=out)

    def split(self, output: Any, items: Sequence[torch.Tensor]) -> list[Any]:
        return split_rows(output, len(items))

    def _normalization(self, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``gain`` and ``shift`` of shape (1, C, 1, 1) on ``device`` for a batch transported as ``dtype``.

        Made once per device and dtype; on CUDA the stream that made them is synchronized, so any stream may
        read them afterwards.
        """
        key = (device, dtype)
        if key not in self._constants:
            mean = torch.tensor(self.mean, dtype=torch.float32).view(1, -1, 1, 1)
            std = torch.tensor(self.std, dtype=torch.float32).view(1, -1, 1, 1)
            gain = (1.0 / (std * value_scale(dtype))).to(device)
            shift = (-mean / std).to(device)
            if device.type == "cuda":
                torch.cuda.current_stream(device).synchronize()
            self._constants[key] = (gain, shift)
        return self._constants[key]


def _size(size: int | Sequence[int]) -> tuple[int, int]:
    pair = (size, size) if isinstance(size, int) else tuple(size)
    if len(pair) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in pair):
        raise ValueError(f"image adapter: size must be an int or (H, W) of ints >= 1, got {size!r}")
    return pair  # type: ignore[return-value]


def _per_channel(option: str, values: Sequence[float] | None, imagenet: tuple[float, ...], channels: int
                 ) -> tuple[float, ...]:
    if values is None:
        if channels != len(imagenet):
            raise ValueError(f"image adapter: give {option} for {channels} channel(s) (the ImageNet default has 3)")
        return imagenet
    values = tuple(float(v) for v in values)
    if len(values) != channels:
        raise ValueError(f"image adapter: {option} needs one value per channel ({channels}), got {values}")
    return values


def _model_dtype(dtype: torch.dtype | str) -> torch.dtype:
    resolved = _MODEL_DTYPES.get(dtype, dtype) if isinstance(dtype, str) else dtype
    if resolved not in _MODEL_DTYPES.values():
        raise ValueError(f"image adapter: dtype must be one of {sorted(_MODEL_DTYPES)}, got {dtype!r}")
    return resolved
