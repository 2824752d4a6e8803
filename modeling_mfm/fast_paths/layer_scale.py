"""Skipping BEiT's switched-off layer scale.

transformers' BEiT keeps the float 1.0 as ``lambda_1``/``lambda_2`` when the layer scale is off
(``layer_scale_init_value`` 0, as in every MFM ViT) and still multiplies every block's two branch outputs by it: a
full-size kernel forward and backward for nothing (its share of the step: docs/performance.md).
`UnitLayerScale` stands for that 1.0: multiplying by it returns the tensor itself. torch.compile (2.14 and later)
sees a plain 1.0, whose multiply it fuses away, with no graph break; earlier versions break the graph at each
multiply (two per block), so there the plain 1.0 stays (`FLOAT_SUBCLASSES_TRACEABLE`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

__all__ = ["FLOAT_SUBCLASSES_TRACEABLE", "UnitLayerScale", "skip_unit_layer_scales"]

# torch.compile traces arithmetic on float subclasses from torch 2.14 on; earlier versions break the graph at each
# such multiply (two per block).
FLOAT_SUBCLASSES_TRACEABLE = torch.__version__ >= "2.14"
_SCALES = ("lambda_1", "lambda_2")


class UnitLayerScale(float):
    """A layer scale of 1.0 whose multiply returns the other operand itself."""

    def __mul__(self, other: torch.Tensor) -> torch.Tensor:
        return other

    __rmul__ = __mul__

    def __repr__(self) -> str:
        return "1.0 (no layer scale)"


def skip_unit_layer_scales(model: nn.Module) -> tuple[int, Callable[[], None]]:
    """Replaces the float 1.0 layer scales under ``model`` (no parameters change), where torch.compile can trace the
    replacement. Returns how many blocks, and the undo."""
    if not FLOAT_SUBCLASSES_TRACEABLE:
        return 0, lambda: None
    blocks = [
        module for module in model.modules()
        if all(type(getattr(module, name, None)) is float and getattr(module, name) == 1.0 for name in _SCALES)
    ]
    for block in blocks:
        for name in _SCALES:
            setattr(block, name, UnitLayerScale(1.0))

    def undo() -> None:
        for block in blocks:
            for name in _SCALES:
                if isinstance(getattr(block, name), UnitLayerScale):
                    setattr(block, name, 1.0)

    return len(blocks), undo
