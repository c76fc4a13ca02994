"""The ``detection`` adapter with torchvision's fasterrcnn_mobilenet_v3_large_320_fpn (random weights, eval mode,
score threshold 0 so every image has boxes) through a real scheduler.

torchvision pads a batch to its largest resized image, so an image's detections equal its detections alone when
its batch-mates resize to the same shape (here: different sizes, one aspect ratio, all resized to 320x480);
tolerance atol 1e-3 (box pixels, scores), rtol 1e-5. For a batch of mixed aspect ratios the adapter must hand the model
exactly those images: results equal the model run directly on the same list.
"""

import warnings

import numpy as np
import torch
from PIL import Image

import batchplex_vision
from batchplex import BatchPolicy, Scheduler
from batchplex.testing import assert_same_result, check_adapter, scripting
from batchplex_vision import DetectionAdapter, model_area

SAME_ASPECT = [(64, 96), (96, 144), (128, 192)]     # H x W, all resized by the model to 320 x 480
MIXED = [(64, 96), (160, 100), (128, 128), (72, 72)]
TOL = {"atol": 1e-3, "rtol": 1e-5}


def random_images(sizes, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=generator) for h, w in sizes]


def direct(model, images, device):
    """The reference: the model called on the float [0, 1] images, as torchvision documents."""
    with torch.inference_mode():
        outputs = model([(image.float() / 255).to(device) for image in images])
    return [{key: value.cpu() for key, value in output.items()} for output in outputs]


async def detect(model, device, items, submit_all, policy=None, **options):
    async with Scheduler(plugins=[batchplex_vision], autoload=False) as scheduler:
        scheduler.add_workload("detect", adapter="detection", model=model, device=device, adapter_options=options,
                               policy=policy or BatchPolicy(max_batch_size=len(items), max_wait_ms=10_000))
        results = await submit_all(scheduler, "detect", items)
        return results, scheduler.statistics()["detect"]


def assert_in_image(result, image):
    boxes = result["boxes"]
    height, width = image.shape[-2:]
    assert len(boxes) > 0
    assert (boxes >= 0).all() and (boxes[:, [0, 2]] <= width).all() and (boxes[:, [1, 3]] <= height).all()


async def test_a_batch_of_mixed_sizes_equals_each_image_alone(detector, device, submit_all):
    images = random_images(SAME_ASPECT)
    items = [images[0], images[1].permute(1, 2, 0).numpy(), Image.fromarray(images[2].permute(1, 2, 0).numpy())]
    results, stats = await detect(detector, device, items, submit_all)
    assert stats["batches"] == 1 and stats["mean_batch_size"] == 3
    for image, result in zip(images, results):
        assert set(result) == {"boxes", "labels", "scores"} and result["boxes"].device.type == "cpu"
        assert_in_image(result, image)
        assert_same_result(result, direct(detector, [image], device)[0], **TOL)
    # boxes are in each image's own coordinates (not the model's 320x480 frame, not the smallest image's)
    assert results[2]["boxes"][:, 2].max() > SAME_ASPECT[0][1]


async def test_mixed_aspect_ratios_reach_the_model_unpadded_and_in_order(detector, device, submit_all):
    images = random_images(MIXED, seed=1)
    items = [images[0], images[1].float() / 255, images[2], images[3].permute(1, 2, 0)]
    results, _ = await detect(detector, device, items, submit_all)
    for image, result, expected in zip(images, results, direct(detector, images, device)):
        assert_in_image(result, image)
        assert_same_result(result, expected, **TOL)


async def test_a_torchscript_detector_gives_the_eager_detectors_results(detector, device, submit_all):
    """A scripted torchvision detector returns (losses, detections); the adapter hands out the detections."""
    images = random_images(SAME_ASPECT, seed=2)
    with scripting(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="RCNN always returns")
        scripted = torch.jit.script(detector.to(device))
        results, stats = await detect(scripted, device, images, submit_all)
    assert stats["batches"] == 1 and stats["failed"] == 0
    for image, result, expected in zip(images, results, direct(detector, images, device)):
        assert set(result) == {"boxes", "labels", "scores"}
        assert_in_image(result, image)
        assert_same_result(result, expected, **TOL)


async def test_results_on_device_stay_on_the_device(detector, device, submit_all):
    results, _ = await detect(detector, device, random_images(SAME_ASPECT[:2], seed=3), submit_all,
                              results_on_device=True)
    assert {value.device.type for result in results for value in result.values()} == {device.type}


def test_cost_is_the_area_the_model_computes_on(detector):
    images = [(image.float() / 255) for image in random_images([(64, 96), (200, 90), (40, 400)])]
    min_size, max_size = detector.transform.min_size[0], detector.transform.max_size
    resized, _ = detector.transform(images)
    adapter = DetectionAdapter(model_resize=(min_size, max_size))
    for image, (h, w) in zip(images, resized.image_sizes):
        assert adapter.cost(adapter.prepare(image)) == h * w == model_area(*image.shape[1:], (min_size, max_size))
    assert DetectionAdapter().cost(DetectionAdapter().prepare(images[0])) == 64 * 96


async def test_area_buckets_group_similar_sizes_and_cut_padding_waste(submit_all):
    def sizes_model(batch):  # a stand-in detector: reports the size of each image it got
        return [{"size": torch.tensor(image.shape[-2:])} for image in batch]

    sizes = [(16, 16), (128, 128), (20, 16), (120, 128), (16, 20), (128, 120)]
    images = random_images(sizes, seed=4)
    mixed_results, mixed = await detect(sizes_model, "cpu", images, submit_all,
                                        policy=BatchPolicy(max_batch_size=3, max_wait_ms=10_000))
    bucketed_results, bucketed = await detect(
        sizes_model, "cpu", images, submit_all,
        policy=BatchPolicy(max_batch_size=3, max_wait_ms=10_000, bucket_edges=(32 * 32, 256 * 256)))
    for size, first, second in zip(sizes, mixed_results, bucketed_results):
        assert first["size"].tolist() == second["size"].tolist() == list(size)
    assert mixed["batches"] == bucketed["batches"] == 2
    assert bucketed["padding_waste"] < 0.2 < mixed["padding_waste"]


def test_padding_an_image_list_adds_no_images():
    adapter = DetectionAdapter()
    images = [adapter.prepare(image) for image in random_images([(8, 8), (4, 4)])]
    assert len(adapter.collate(images, torch.device("cpu"), batch_size=8)) == 2
    assert adapter.padded_cost([64, 16], batch_size=8) == 128


def test_check_adapter(detector, device):
    images = random_images(SAME_ASPECT[:2], seed=5)
    check_adapter(DetectionAdapter(), [images[0], images[1].numpy().astype(np.float32) / 255],
                  detector.to(device), device=device, **TOL)
