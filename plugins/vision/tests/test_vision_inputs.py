"""Request parsing shared by both adapters: accepted types, layout rules, refusals (rule and value), and a bad
request failing at submit through a real scheduler while its batch-mates succeed."""

import asyncio
import math

import numpy as np
import pytest
import torch
from PIL import Image

import batchplex_vision
from batchplex import BatchPolicy, InvalidRequestError, Scheduler
from batchplex_vision import DetectionAdapter, ImageAdapter

torch.manual_seed(0)
CHW = torch.randint(0, 256, (3, 5, 7), dtype=torch.uint8)


ADAPTERS = {
    "image": lambda channels: ImageAdapter(size=(8, 8), channels=channels, mean=(0.5,) * channels,
                                           std=(0.25,) * channels),
    "detection": lambda channels: DetectionAdapter(channels=channels),
}


def prepare(item, **options):
    return DetectionAdapter(**options).prepare(item)


@pytest.mark.parametrize("item", [
    CHW,
    CHW.permute(1, 2, 0),                                   # HWC tensor (a non-contiguous view)
    CHW.permute(1, 2, 0).numpy(),                           # HWC numpy array
    np.ascontiguousarray(CHW.numpy()),                      # CHW numpy array
    Image.fromarray(CHW.permute(1, 2, 0).numpy(), "RGB"),   # PIL image
], ids=["chw-tensor", "hwc-tensor", "hwc-numpy", "chw-numpy", "pil"])
def test_every_accepted_type_becomes_the_same_contiguous_chw_uint8(item):
    prepared = prepare(item)
    assert prepared.dtype == torch.uint8 and prepared.is_contiguous()
    assert torch.equal(prepared, CHW)


def test_float_images_become_float32_and_keep_their_values():
    image = torch.rand(3, 4, 6, dtype=torch.float64)
    prepared = prepare(image.permute(1, 2, 0).numpy())
    assert prepared.dtype == torch.float32 and prepared.shape == (3, 4, 6)
    torch.testing.assert_close(prepared, image.float())
    assert prepare(image.to(torch.bfloat16)).dtype == torch.float32


def test_grayscale_images_need_channels_1():
    gray = torch.randint(0, 256, (4, 6), dtype=torch.uint8)
    assert torch.equal(prepare(gray, channels=1), gray[None])
    assert torch.equal(prepare(Image.fromarray(gray.numpy(), "L"), channels=1), gray[None])
    with pytest.raises(InvalidRequestError) as caught:
        prepare(gray)
    assert caught.value.rule == "channel count" and caught.value.value == (4, 6)


def test_a_shape_with_the_channel_count_at_both_ends_needs_an_explicit_layout():
    image = torch.randint(0, 256, (3, 8, 3), dtype=torch.uint8)
    with pytest.raises(InvalidRequestError, match="layout='CHW'") as caught:
        prepare(image)
    assert caught.value.rule == "unambiguous layout" and caught.value.value == (3, 8, 3)
    assert prepare(image, layout="CHW").shape == (3, 8, 3)
    assert torch.equal(prepare(image, layout="HWC"), image.permute(2, 0, 1))


def test_an_explicit_layout_still_checks_the_channel_axis():
    with pytest.raises(InvalidRequestError) as caught:
        prepare(torch.zeros(5, 5, 3, dtype=torch.uint8), layout="CHW")
    assert caught.value.rule == "channel count"


BAD = {  # request, channels, rule, value, what the message shows
    "wrong channel count (CHW)": (torch.zeros(4, 8, 8, dtype=torch.uint8), 3, "channel count", (4, 8, 8),
                                  "(4, 8, 8)"),
    "wrong channel count (HWC)": (np.zeros((8, 8, 2), np.uint8), 3, "channel count", (8, 8, 2), "(8, 8, 2)"),
    "RGBA PIL image": (Image.new("RGBA", (4, 4)), 3, "channel count", "RGBA", "'RGBA'"),
    "rank 1": (torch.zeros(12, dtype=torch.uint8), 3, "rank", (12,), "rank 1"),
    "rank 4 (a batch)": (torch.zeros(1, 3, 8, 8, dtype=torch.uint8), 3, "rank", (1, 3, 8, 8), "(1, 3, 8, 8)"),
    "empty": (torch.zeros(3, 0, 8, dtype=torch.uint8), 3, "non-empty", (3, 0, 8), "(3, 0, 8)"),
    "NaN pixel": (torch.full((3, 4, 4), math.nan), 3, "finite values", math.nan, "nan"),
    "inf pixel": (torch.ones(3, 4, 4).index_fill_(1, torch.tensor([2]), math.inf), 3, "finite values",
                  math.inf, "inf"),
    "float in 0-255": (torch.full((3, 4, 4), 255.0), 3, "float range [0, 1]", (255.0, 255.0), "[255, 255]"),
    "int64 pixels": (torch.zeros(3, 4, 4, dtype=torch.int64), 3, "pixel dtype", torch.int64, "torch.int64"),
    "bool array": (np.zeros((4, 4, 3), bool), 3, "pixel dtype", np.dtype(bool), "bool"),
    "16-bit PIL image": (Image.new("I;16", (4, 4)), 1, "pixel dtype", "I;16", "'I;16'"),
    "a list": ([[1, 2], [3, 4]], 3, "image type", list, "builtins.list"),
    "a string": ("cat.jpg", 3, "image type", str, "builtins.str"),
}


@pytest.mark.parametrize("item, channels, rule, value, shown", BAD.values(), ids=BAD.keys())
@pytest.mark.parametrize("adapter", ADAPTERS)
def test_bad_input_names_the_rule_and_the_value(adapter, item, channels, rule, value, shown):
    with pytest.raises(InvalidRequestError) as caught:
        ADAPTERS[adapter](channels).prepare(item)
    error = caught.value
    assert error.rule == rule
    assert math.isnan(error.value) if value is math.nan else error.value == value
    assert shown in str(error)


def test_request_parameters_are_refused():
    with pytest.raises(InvalidRequestError) as caught:
        ImageAdapter(size=(5, 7)).prepare(CHW, crop=True)
    assert caught.value.rule == "no parameters" and caught.value.value == ["crop"]


@pytest.mark.parametrize("options", [
    {"size": (224,)}, {"size": 0}, {"mean": (0.5, 0.5)}, {"std": (1.0, 0.0, 1.0)}, {"dtype": torch.int8},
    {"dtype": "float64"}, {"layout": "NHWC"}, {"channels": 0},
])
def test_bad_image_options_fail_when_the_workload_is_configured(options):
    with pytest.raises(ValueError):
        ImageAdapter().configure(**options)


def test_image_dtype_option_takes_names_and_dtypes():
    assert ImageAdapter(dtype="bfloat16").dtype == ImageAdapter(dtype=torch.bfloat16).dtype == torch.bfloat16


@pytest.mark.parametrize("options", [{"model_resize": (640, 320)}, {"model_resize": (320,)}, {"channels": True}])
def test_bad_detection_options_fail_when_the_workload_is_configured(options):
    with pytest.raises(ValueError):
        DetectionAdapter().configure(**options)


@pytest.mark.parametrize("adapter, options", [("image", {"size": (8, 8)}), ("detection", {})])
async def test_a_bad_request_fails_at_submit_and_its_batch_mates_succeed(adapter, options):
    good = [torch.randint(0, 256, (3, 8, 8), dtype=torch.uint8) for _ in range(3)]
    bad = [torch.zeros(4, 8, 8, dtype=torch.uint8), torch.zeros(8, dtype=torch.uint8),
           torch.zeros(3, 0, 8, dtype=torch.uint8), torch.full((3, 8, 8), math.nan), "not an image"]

    def model(batch):
        return batch if adapter == "image" else [{"pixels": image} for image in batch]

    async with Scheduler(plugins=[batchplex_vision], autoload=False) as scheduler:
        scheduler.add_workload("w", adapter=adapter, adapter_options=options, model=model,
                               policy=BatchPolicy(max_batch_size=len(good), max_wait_ms=10_000))
        first = [asyncio.ensure_future(scheduler.submit("w", image)) for image in good[:-1]]
        await asyncio.sleep(0)
        for item in bad:
            with pytest.raises(InvalidRequestError) as caught:
                await scheduler.submit("w", item)
            assert caught.value.workload == "w" and caught.value.rule
        results = await asyncio.gather(*first, scheduler.submit("w", good[-1]))
        stats = scheduler.statistics()["w"]
    assert stats["batches"] == 1 and stats["completed"] == len(good) and stats["rejected_invalid"] == len(bad)
    for image, result in zip(good, results):
        pixels = result if adapter == "image" else result["pixels"]
        assert pixels.shape == (3, 8, 8)
