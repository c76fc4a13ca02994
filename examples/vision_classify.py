"""Classify single images with batchplex: many concurrent callers, one batched model.

Each caller submits one image (a uint8 tensor, a numpy array or a PIL image, of any size: ``resize=True``) and
gets its own logits back; batchplex batches the images, ships them to the device as uint8 and normalizes them there.
The model has random weights (no download), so the classes are meaningless; the batching is the point.

    python examples/vision_classify.py
"""

import asyncio

import numpy as np
import torch
import torchvision
from PIL import Image

from batchplex import BatchPolicy, InvalidRequestError, Scheduler


async def main() -> None:
    device = "cuda:0" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).eval()
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (rng.integers(100, 300), rng.integers(100, 300), 3), dtype=np.uint8)
              for _ in range(24)]
    requests = [Image.fromarray(image) if i % 3 == 0 else image if i % 3 == 1 else
                torch.from_numpy(image).permute(2, 0, 1) for i, image in enumerate(images)]

    async with Scheduler() as scheduler:
        scheduler.add_workload("classify", adapter="image", model=model, device=device,
                               adapter_options={"size": (160, 160), "resize": True},
                               policy=BatchPolicy(max_batch_size=8, max_wait_ms=5))
        logits = await asyncio.gather(*(scheduler.submit("classify", request) for request in requests))
        try:
            await scheduler.submit("classify", np.zeros((64, 64, 4), np.uint8))  # RGBA: refused at submit
        except InvalidRequestError as error:
            print(f"refused: {error} (rule {error.rule!r})")
        stats = scheduler.statistics()["classify"]

    print(f"{len(logits)} images on {device}: top-1 classes {[int(row.argmax()) for row in logits]}")
    print(f"{stats['batches']} batches, mean batch size {stats['mean_batch_size']:.1f}, "
          f"run p50 {stats['run_ms']['p50']:.1f} ms")


if __name__ == "__main__":
    asyncio.run(main())
