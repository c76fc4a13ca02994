"""The ``detection`` adapter: images of any size, handed to the model as a list of on-device float images.

torchvision detection models take a list of float CHW images in [0, 1], each of its own size, and resize, normalize
and pad them to a batch themselves (to the largest resized image, rounded up to a multiple of 32). So this adapter
adds no padding: at collate it flattens the batch's images into one pinned host buffer (``uint8`` when every image
is), moves it with one copy, converts it to float on the device with one kernel and cuts it into one CHW view per
image. The batch is that list, not a ``torch.nested`` tensor: the jagged layout allows one ragged dimension only
(images differ in height *and* width), torchvision's detectors take lists, and a strided nested tensor (a prototype
API) has no ``record_stream``, which the executor calls on CUDA inputs.

Results come back one dict per request (``boxes``, ``labels``, ``scores``, and ``masks``/``keypoints`` where the
model gives them), in the request image's own pixel coordinates: torchvision's transform maps its detections back
from the resized to the original image size.

A detector compiled with ``torch.jit.script`` works as it is (its ``(losses, detections)`` pair is read for the
detections). Why script one: torchvision's detectors are host-bound (fasterrcnn_mobilenet_v3_large_320_fpn in
batches of 8 on H200s: 20-26 ms a batch, the GPU 33-43% busy), and TorchScript runs a scripted forward in C++ with
the GIL released, so in a process that batches other workloads too the detector no longer holds their threads back
(see the README's "Several workloads on one GPU"). TorchScript is deprecated from torch 2.14 (a ``FutureWarning``)
but still runs. On CUDA, keep TorchScript's fusers off for as long as the detector serves: the default NNC fuser
fails on it with "Global alloc not supported yet", and the flags are process-wide and read when TorchScript
optimizes (on the second call, and again for new shapes), so enter ``torch.jit.fuser("none")`` around the whole
``async with Scheduler(...)`` block.

Batching note: the model pads a batch to its largest resized image, so an image's detections can differ slightly
(and with untrained weights, a lot) between running alone and running next to images of another aspect ratio;
results are the same as alone when the batch's images resize to the same padded shape. Size buckets reduce both
that effect and the wasted compute: ``cost`` is the pixel area the model computes on (after the model's own resize
when ``model_resize`` is given), so the policy's ``bucket_edges`` (pixel areas) group images of similar area.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ._base import ImageRequests
from ._transport import cat_to_device, unify, value_scale

__all__ = ["DetectionAdapter", "model_area"]


class DetectionAdapter(ImageRequests):
    """One image of any size per request; the batch is a list of float [0, 1] CHW images on the device.

    ``model_resize=(min_size, max_size)`` tells the adapter how the model resizes its inputs (torchvision:
    ``(model.transform.min_size[0], model.transform.max_size)``) so that costs count the pixels it computes on;
    left out, costs are the images' own areas. ``channels``, ``layout`` and ``results_on_device`` as in `ImageRequests`.
    """

    name = "detection"

    def __init__(self, model_resize: Sequence[int] | None = None, *, channels: int = 3, layout: str = "auto",
                 results_on_device: bool = False) -> None:
        super().__init__(channels=channels, layout=layout, results_on_device=results_on_device)
        self.model_resize = _model_resize(model_resize)

    def prepare(self, item: Any, **params: Any) -> torch.Tensor:
        return self.image(item, params)

    def cost(self, prepared: torch.Tensor) -> int:
        """Pixels the model computes on for this image (its area, after the model's resize when known)."""
        return model_area(prepared.shape[1], prepared.shape[2], self.model_resize)

    def padded_cost(self, costs: Sequence[int], batch_size: int) -> int:
        """The model pads the batch's images to a common size: estimated as ``len(costs) x max(costs)``.

        The list is never padded with extra images, so ``batch_size`` (a policy's preferred size) adds nothing.
        The estimate is exact when the batch's images share one shape; it undercounts a batch that mixes tall and
        wide images of similar area (padded to max height x max width) and the model's round-up to a multiple of
        32, which costs alone cannot tell.
        """
        return len(costs) * max(costs)

    def collate(self, items: Sequence[torch.Tensor], device: torch.device, batch_size: int) -> list[torch.Tensor]:
        """The batch's images as on-device float32 CHW views in [0, 1]: one copy and one conversion per batch.

        ``batch_size`` is not used: the model takes a list of any length, so padding it would only waste work.
        """
        items = unify(items)
        flat = cat_to_device(items, device)
        if flat.dtype == torch.uint8:
            flat = torch.div(flat, value_scale(flat.dtype))
        parts = torch.split(flat, [item.numel() for item in items])
        return [part.view(item.shape) for part, item in zip(parts, items)]

    def split(self, output: Any, items: Sequence[torch.Tensor]) -> list[dict[str, Any]]:
        """One dict of the model's fields per request (the model gives one per image, in order)."""
        output = _detections(output)
        if not (isinstance(output, Sequence) and all(isinstance(result, Mapping) for result in output)):
            raise TypeError(f"detection adapter: the model must return one dict per image (torchvision detection "
                            f"models in eval mode do), got {type(output).__name__}")
        return [dict(result) for result in output]


def _detections(output: Any) -> Any:
    """The per-image results in ``output``: a TorchScript torchvision detector returns ``(losses, detections)``
    (a scripted function has one return type, so eval mode cannot drop the losses), an eager one the detections."""
    if (isinstance(output, tuple) and len(output) == 2 and isinstance(output[0], Mapping)
            and isinstance(output[1], list)):
        return output[1]
    return output


def model_area(height: int, width: int, model_resize: tuple[int, int] | None) -> int:
    """The pixel area of an image after torchvision's detection resize (shorter side to ``min_size``, unless the
    longer side would pass ``max_size``); the image's own area when ``model_resize`` is None."""
    if model_resize is None:
        return height * width
    min_size, max_size = model_resize
    scale = min(min_size / min(height, width), max_size / max(height, width))
    return math.floor(height * scale) * math.floor(width * scale)


def _model_resize(value: Sequence[int] | None) -> tuple[int, int] | None:
    if value is None:
        return None
    pair = tuple(value)
    if not (len(pair) == 2 and all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in pair)
            and pair[0] <= pair[1]):
        raise ValueError(f"detection adapter: model_resize must be (min_size, max_size) with "
                         f"1 <= min_size <= max_size, got {value!r}")
    return pair  # type: ignore[return-value]
