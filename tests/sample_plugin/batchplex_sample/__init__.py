"""A minimal installed plugin: one adapter, ``sample-doubler``, whose model input is each number doubled."""

import torch

import batchplex
from batchplex.collate import split_rows


class DoublerAdapter(batchplex.Adapter):
    name = "sample-doubler"

    def prepare(self, item, **params):
        if not isinstance(item, (int, float)) or isinstance(item, bool):
            raise batchplex.InvalidRequestError("a sample request must be a number", rule="number", value=item)
        return float(item)

    def collate(self, items, device, batch_size):
        return torch.tensor(items, device=device) * 2

    def split(self, output, items):
        return split_rows(output, len(items))


@batchplex.hookimpl
def register_adapters(register):
    register(DoublerAdapter())
