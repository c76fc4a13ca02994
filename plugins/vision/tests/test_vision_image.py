"""The ``image`` adapter with torchvision's resnet18 (random weights, eval mode) through a real scheduler: every
input type, batched with other requests, gives the logits of the same image run alone with torchvision-style
preprocessing (float32: atol 1e-4, rtol 1e-4); plus resizing, channels_last and low-precision input, results left
on the device, and the contract check."""

import copy

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as TF

import batchplex_vision
from batchplex import BatchPolicy, InvalidRequestError, Scheduler
from batchplex.testing import check_adapter
from batchplex_vision import IMAGENET_MEAN, IMAGENET_STD, ImageAdapter

SIZE = (48, 64)
TOL = {"atol": 1e-4, "rtol": 1e-4}


def random_images(count, size=SIZE, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (3, *size), dtype=torch.uint8, generator=generator) for _ in range(count)]


def alone(model, chw_uint8, device, dtype=torch.float32):
    """The reference: one image, preprocessed the torchvision way, run on its own."""
    x = TF.normalize(chw_uint8.float() / 255, list(IMAGENET_MEAN), list(IMAGENET_STD))[None].to(device, dtype)
    with torch.inference_mode():
        return model(x)[0].float().cpu()


def as_types(images):
    """The same uint8 images as every accepted request type, in turn."""
    forms = [lambda t: t, lambda t: t.permute(1, 2, 0), lambda t: t.permute(1, 2, 0).numpy(),
             lambda t: Image.fromarray(t.permute(1, 2, 0).numpy(), "RGB"), lambda t: np.ascontiguousarray(t.numpy())]
    return [forms[i % len(forms)](image) for i, image in enumerate(images)]


async def run(model, device, items, submit_all, policy=None, **options):
    async with Scheduler(plugins=[batchplex_vision], autoload=False) as scheduler:
        scheduler.add_workload("classify", adapter="image", model=model, device=device,
                               adapter_options={"size": SIZE, **options},
                               policy=policy or BatchPolicy(max_batch_size=len(items), max_wait_ms=10_000))
        results = await submit_all(scheduler, "classify", items)
        return results, scheduler.statistics()["classify"]


async def test_uint8_tensors_arrays_and_pil_images_batched_equal_each_alone(resnet, device, submit_all):
    images = random_images(5)
    results, stats = await run(resnet, device, as_types(images), submit_all)
    assert stats["batches"] == 1 and stats["mean_batch_size"] == 5
    for image, result in zip(images, results):
        assert result.device.type == "cpu" and result.shape == (1000,)
        torch.testing.assert_close(result, alone(resnet, image, device), **TOL)


async def test_float_images_batched_with_uint8_ones_equal_each_alone(resnet, device, submit_all):
    images = random_images(4, seed=1)
    floats = [images[0].float() / 255, (images[1].double() / 255).permute(1, 2, 0).numpy()]
    results, stats = await run(resnet, device, floats + images[2:], submit_all)
    assert stats["batches"] == 1
    for image, result in zip(images, results):
        torch.testing.assert_close(result, alone(resnet, image, device), **TOL)


async def test_resize_option_resizes_at_submit_and_refuses_otherwise(resnet, device, submit_all):
    images = random_images(2, size=(96, 80), seed=2) + random_images(1, size=SIZE, seed=3)
    results, _ = await run(resnet, device, images, submit_all, resize=True)
    for image, result in zip(images, results):
        resized = TF.resize(image, list(SIZE), antialias=True)
        torch.testing.assert_close(result, alone(resnet, resized, device), **TOL)
    async with Scheduler(plugins=[batchplex_vision], autoload=False) as scheduler:
        scheduler.add_workload("strict", adapter="image", model=resnet, device=device,
                               adapter_options={"size": SIZE})
        with pytest.raises(InvalidRequestError, match="resize=True") as caught:
            await scheduler.submit("strict", images[0])
    assert caught.value.rule == "image size" and caught.value.value == (96, 80)


class Recorder(torch.nn.Module):
    """Wraps a model and records the dtype and memory format of each input batch it gets."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.seen = []

    def forward(self, batch):
        self.seen.append((batch.dtype, batch.is_contiguous(memory_format=torch.channels_last), batch.device.type))
        return self.model(batch)


async def test_channels_last_and_low_precision_input_are_made_on_the_device(resnet, device, submit_all):
    dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    model = Recorder(copy.deepcopy(resnet)).to(dtype=dtype, memory_format=torch.channels_last)
    images = random_images(4, seed=4)
    results, _ = await run(model, device, images, submit_all, channels_last=True, dtype=dtype)
    assert model.seen == [(dtype, True, device.type)]
    for image, result in zip(images, results):
        assert result.dtype == dtype
        # batched vs alone, both in 16-bit floats (bfloat16 keeps about 3 significant digits)
        torch.testing.assert_close(result.float(), alone(model.model, image, device, dtype), atol=0.1, rtol=0.05)


async def test_results_on_device_stay_on_the_device(resnet, device, submit_all):
    images = random_images(3, seed=5)
    results, _ = await run(resnet, device, images, submit_all, results_on_device=True)
    assert {result.device.type for result in results} == {device.type}
    for image, result in zip(images, results):
        torch.testing.assert_close(result.cpu(), alone(resnet, image, device), **TOL)


async def test_padded_static_batches_split_back_to_the_real_requests(resnet, device, submit_all):
    images = random_images(3, seed=6)
    results, stats = await run(resnet, device, images, submit_all, policy=BatchPolicy.static(4, max_wait_ms=20))
    assert stats["batches"] == 1 and stats["padding_waste"] == pytest.approx(0.25)  # 3 images in 4 rows
    for image, result in zip(images, results):
        torch.testing.assert_close(result, alone(resnet, image, device), **TOL)


def test_check_adapter(resnet, device):
    adapter = ImageAdapter(size=SIZE, channels_last=True)
    check_adapter(adapter, as_types(random_images(3, seed=7)), resnet.to(device), device=device, pad_to=4, **TOL)
