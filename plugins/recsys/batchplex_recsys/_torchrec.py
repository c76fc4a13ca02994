"""torchrec and fbgemm, imported when a ranking workload is configured rather than when the plugin is loaded.

The plugin is listed by ``batchplex plugins`` and registers its adapter without them; configuring a workload
imports them and, if that fails, raises `TorchrecMissingError` with the install commands that fit this machine.
torchrec needs fbgemm: the CUDA build (``fbgemm-gpu``) where an NVIDIA driver is present, the CPU build
(``fbgemm-gpu-cpu``) elsewhere. The plugin runs on either: every fbgemm operator it calls runs on host tensors.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
from batchplex import PluginError

__all__ = ["Torchrec", "TorchrecMissingError", "load", "install_hint"]


class TorchrecMissingError(PluginError, ImportError):
    """torchrec or fbgemm could not be imported; the message says what failed and how to install them."""


@dataclass(frozen=True)
class Torchrec:
    """The few torchrec/fbgemm entry points the adapter uses."""

    KeyedJaggedTensor: type
    JaggedTensor: type
    #: ``fbgemm::permute_1D_sparse_data(permute, lengths, values, weights, permuted_lengths_sum)``
    permute_1d: Callable
    #: ``fbgemm::asynchronous_complete_cumsum(lengths)``: offsets with a leading 0
    complete_cumsum: Callable


@functools.cache
def load() -> Torchrec:
    """Import torchrec and fbgemm once; raise `TorchrecMissingError` naming the cause and the fix."""
    try:
        import fbgemm_gpu  # noqa: F401  (registers torch.ops.fbgemm)
        from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor

        ops = torch.ops.fbgemm
        return Torchrec(KeyedJaggedTensor, JaggedTensor, ops.permute_1D_sparse_data, ops.asynchronous_complete_cumsum)
    except Exception as exc:  # ImportError, or OSError/RuntimeError from a CUDA build without a driver
        raise TorchrecMissingError(
            f"the 'recsys' plugin needs torchrec and fbgemm, and importing them failed: "
            f"{type(exc).__name__}: {exc}\n{install_hint()}") from exc


def install_hint(torch_version: str = torch.__version__) -> str:
    """The commands that install torchrec and a matching fbgemm for ``torch_version``."""
    major, minor = (int(part) for part in torch_version.split("+")[0].split(".")[:2])
    release = f"1.{minor - 5}.*" if major == 2 and minor >= 5 else None  # torch 2.N pairs with 1.(N-5)
    pin = f"=={release}" if release else ""
    which = f"the {release} releases match torch {torch_version}" if release else \
        f"pick the torchrec/fbgemm releases built for torch {torch_version}"
    return (f"Install them ({which}):\n"
            f"  with an NVIDIA driver:    pip install torchrec{pin}\n"
            f"  without one (CPU build):  pip install fbgemm-gpu-cpu{pin} && "
            f"pip install --no-deps torchrec{pin} && pip install tensordict iopath pyre-extensions "
            f"torchmetrics tqdm")
