"""A dispatcher probe for host synchronisations, shared by the tests that check a step never waits for the device."""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# aten operators that read device memory on the host, or whose output size depends on tensor values
SYNCHRONISING = {
    "_local_scalar_dense", "is_nonzero", "equal", "nonzero", "nonzero_static", "masked_select", "_unique",
    "_unique2", "unique_dim", "unique_consecutive", "repeat_interleave", "bincount", "histc",
}
# indexing operators whose output (or work) depends on how many entries a boolean mask selects
MASK_INDEXING = {"index", "index_put", "index_put_", "_index_put_impl_"}


class SynchronisationProbe(TorchDispatchMode):
    """Records the synchronising operators that run while it is active."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name.split("::")[-1]
        if name in SYNCHRONISING:
            self.seen.append(name)
        elif name in MASK_INDEXING and any(_is_mask(index) for index in args[1]):
            self.seen.append(f"{name} with a boolean mask")
        return func(*args, **(kwargs or {}))


def _is_mask(index) -> bool:
    return isinstance(index, torch.Tensor) and index.dtype in (torch.bool, torch.uint8)
