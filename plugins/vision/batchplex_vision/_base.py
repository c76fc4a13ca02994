"""What the image adapters share: the request options (channels, layout, where results land) and `prepare`'s
first step, turning the request into a CHW tensor."""

from __future__ import annotations

from typing import Any

import torch
from batchplex import Adapter, InvalidRequestError

from ._inputs import check_layout, to_chw

__all__ = ["ImageRequests"]


class ImageRequests(Adapter[torch.Tensor]):
    """Base of the vision adapters: one request is one image, prepared into a contiguous CHW tensor.

    ``channels`` is the channel count every image must have; ``layout`` is ``"auto"`` (see `batchplex_vision.
    _inputs` for the rules), ``"CHW"`` or ``"HWC"``; ``results_on_device=True`` leaves the model's output on the
    device (no copy to host memory before ``split``), for callers that keep working on the GPU.
    """

    def __init__(self, *, channels: int = 3, layout: str = "auto", results_on_device: bool = False) -> None:
        if not (isinstance(channels, int) and not isinstance(channels, bool) and channels >= 1):
            raise ValueError(f"{self.name} adapter: channels must be an int >= 1, got {channels!r}")
        self.channels = channels
        self.layout = check_layout(layout)
        self.results_on_device = bool(results_on_device)
        self.copy_output_to_host = not self.results_on_device

    def image(self, item: Any, params: dict[str, Any]) -> torch.Tensor:
        """The request as a CHW tensor (uint8, or float32 in [0, 1]); refuses request parameters."""
        if params:
            raise InvalidRequestError(f"the {self.name} adapter takes no request parameters, got {sorted(params)}",
                                      rule="no parameters", value=sorted(params))
        return to_chw(item, self.channels, self.layout)
