"""What the fast paths share: the error that says a transformers internal is missing, and how to find encoders."""

from __future__ import annotations

from collections.abc import Iterator

from torch import nn

__all__ = ["MissingInternal", "vit_encoders"]


class MissingInternal(RuntimeError):
    """A fast path needs a transformers internal this release does not have (renamed or removed): the model keeps
    transformers' own forward for it."""


def vit_encoders(model: nn.Module) -> Iterator[nn.Module]:
    """The transformers BEiT / ViT models (``PreTrainedModel`` submodules with such a config) under ``model``."""
    for module in model.modules():
        config = getattr(module, "config", None)
        if getattr(config, "model_type", None) in ("beit", "vit") and hasattr(module, "embeddings"):
            yield module
