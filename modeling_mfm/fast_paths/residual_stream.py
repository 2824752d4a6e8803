"""The opt-in bf16 residual stream of a ViT encoder (``--bf16_residual_stream``)."""

from __future__ import annotations

import torch
from torch import nn

from .registry import vit_encoders

__all__ = ["keep_residual_stream_in_bf16"]


def keep_residual_stream_in_bf16(model: nn.Module) -> torch.utils.hooks.RemovableHandle:
    """Under bf16 autocast, casts a ViT encoder's embeddings (the start of its residual stream) to bf16, so that the
    residual adds of every block, and LayerNorm's reads, move bf16 instead of float32 tensors. Opt-in: plain
    autocast, like the official fp16 recipe, keeps the stream in float32 (linear layers return bf16, LayerNorm
    float32, and a bf16 branch added to a float32 stream is float32). It trades a little accuracy for speed; the
    measurements are in docs/performance.md. Outside bf16 autocast the hook changes nothing. Returns the hook's
    handle (``.remove()`` undoes it)."""
    encoders = list(vit_encoders(model))
    if not encoders:
        kind = getattr(getattr(getattr(model, "config", None), "backbone_config", None), "model_type", "this")
        raise ValueError(f"--bf16_residual_stream is for ViT encoders (beit, vit); this model's is {kind}")

    def cast(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        if not isinstance(output, torch.Tensor):  # an embeddings layer that returns more than the tokens
            return output
        kind = output.device.type
        if torch.is_autocast_enabled(kind) and torch.get_autocast_dtype(kind) == torch.bfloat16:
            return output.to(torch.bfloat16)
        return output

    return encoders[0].embeddings.register_forward_hook(cast)
