"""The ImageNet-1K class names, for the label maps of converted classifiers and their model cards."""

from __future__ import annotations

__all__ = ["imagenet_labels"]


def imagenet_labels() -> list[str]:
    """The 1000 ImageNet-1K class names in index order (shipped with torchvision, no download)."""
    from torchvision.models import ResNet50_Weights

    return list(ResNet50_Weights.IMAGENET1K_V1.meta["categories"])
