"""The opt-in bf16 residual stream of a ViT encoder (``--bf16_residual_stream``), switched by
``apply_fast_paths(model, bf16_residual_stream=True)`` so that the fast paths' handle undoes it with the others."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .registry import vit_encoders

__all__ = ["check_vit_encoder", "keep_residual_stream_in_bf16"]


def check_vit_encoder(model: nn.Module) -> None:
    """Refuses a model without a ViT encoder (ValueError), before `apply_fast_paths` switches anything."""
    if not any(True for _ in vit_encoders(model)):
        kind = getattr(getattr(getattr(model, "config", None), "backbone_config", None), "model_type", "this")
        raise ValueError(f"--bf16_residual_stream is for ViT encoders (beit, vit); this model's is {kind}")


def keep_residual_stream_in_bf16(model: nn.Module) -> tuple[int, Callable[[], None]]:
    """Under bf16 autocast, casts a ViT encoder's embeddings (the start of its residual stream) to bf16, so that the
    residual adds of every block, and LayerNorm's reads, move bf16 instead of float32 tensors. Opt-in: plain
    autocast, like the official fp16 recipe, keeps the stream in float32 (linear layers return bf16, LayerNorm
    float32, and a bf16 branch added to a float32 stream is float32). It trades a little accuracy for speed; the
    measurements are in docs/performance.md. Outside bf16 autocast the hook changes nothing. Returns, as every fast
    path step, the number of modules switched (1) and the undo (the hook's removal)."""
    check_vit_encoder(model)
    encoder = next(vit_encoders(model))

    def cast(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        if not isinstance(output, torch.Tensor):  # an embeddings layer that returns more than the tokens
            return output
        kind = output.device.type
        if torch.is_autocast_enabled(kind) and torch.get_autocast_dtype(kind) == torch.bfloat16:
            return output.to(torch.bfloat16)
        return output

    return 1, encoder.embeddings.register_forward_hook(cast).remove
