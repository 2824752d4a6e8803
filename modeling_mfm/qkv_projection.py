"""Queries, keys and values of the ViT/BEiT attention from one (D x 3D) GEMM instead of three (D x D) ones.

Why: transformers' BEiT and ViT attention project queries, keys and values with three ``nn.Linear`` layers; the
official MFM (and timm) ViT computes them as one ``qkv`` projection. One GEMM three times as wide uses the GPU better
and its backward needs one input-gradient GEMM instead of three plus two sums: on an H100 the compiled ViT-B/16 MFM
step (bf16, batch 128) went from 3,088 to 3,138 img/s (+1.6 %).

The parameters stay the three layers of transformers (the same names and checkpoints); their weights are
concatenated on the fly, which costs a copy of 3·D² weights per layer and step, and autograd splits the gradient
back. The attention itself still goes through transformers' attention interface, so ``attn_implementation``
(SDPA, eager, flex...) and ``output_attentions`` behave as before.

The fused path only reads the three layers' weights, so it is taken only where that is what they compute: plain
``nn.Linear`` layers without hooks. A layer replaced by an adapter (PEFT's LoRA wraps ``q_proj``/``v_proj``), a
quantised subclass, a hooked layer or one whose forward Accelerate wrapped (offloading) sends the attention through
transformers' forward, which calls the layers.

Only on the devices in `FUSED_DEVICE_TYPES` (CUDA): on a CPU the fused step was slower (ViT-B/16 float32, batch 4,
eager: 2,846 against 2,693 ms and 3,042 against 2,931 ms), so there the layers run transformers' own forward.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.beit import modeling_beit
from transformers.models.beit.modeling_beit import BeitAttention
from transformers.models.vit import modeling_vit
from transformers.models.vit.modeling_vit import ViTAttention

__all__ = [
    "FUSED_DEVICE_TYPES",
    "FusedQKVBeitAttention",
    "FusedQKVViTAttention",
    "use_fused_qkv_projection",
    "use_separate_qkv_projections",
]


FUSED_DEVICE_TYPES = ("cuda",)


def _is_plain_linear(layer: nn.Module) -> bool:
    """A layer that computes exactly ``F.linear(x, layer.weight, layer.bias)``: an ``nn.Linear``, no subclass, no
    hooks, no forward replaced on the instance (as Accelerate's offloading hooks do)."""
    return (
        type(layer) is nn.Linear
        and getattr(layer.forward, "__func__", None) is nn.Linear.forward
        and not (layer._forward_hooks or layer._forward_pre_hooks)
    )


def _fused_qkv_attention_forward(
    self: BeitAttention | ViTAttention,
    hidden_states: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The transformers BEiT/ViT attention forward with the three projections computed as one GEMM."""
    projections = (self.q_proj, self.k_proj, self.v_proj)
    if hidden_states.device.type not in FUSED_DEVICE_TYPES or not all(map(_is_plain_linear, projections)):
        return self.separate_forward(hidden_states, attention_mask, **kwargs)
    weight = torch.cat([projection.weight for projection in projections])
    bias = None
    if any(projection.bias is not None for projection in projections):  # BEiT has no key bias: zeros in its place
        bias = torch.cat([
            projection.bias if projection.bias is not None else projection.weight.new_zeros(projection.out_features)
            for projection in projections
        ])
    input_shape = hidden_states.shape[:-1]
    qkv = F.linear(hidden_states, weight, bias).view(*input_shape, 3, -1, self.head_dim)
    # (..., N, 3, heads, head_dim) -> three (..., heads, N, head_dim) views, the layout of the separate projections
    query, key, value = qkv.movedim(-3, 0).transpose(-3, -2).unbind(0)
    attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation,
                                                                self.eager_attention)
    attended, weights = attention_interface(
        self,
        query,
        key,
        value,
        attention_mask,
        dropout=0.0 if not self.training else self.attention_dropout,
        scaling=self.scaling,
        **kwargs,
    )
    return self.o_proj(attended.reshape(*input_shape, -1).contiguous()), weights


class FusedQKVBeitAttention(BeitAttention):
    """`BeitAttention` with one query-key-value GEMM (the same parameters)."""

    eager_attention = staticmethod(modeling_beit.eager_attention_forward)
    separate_forward = BeitAttention.forward
    forward = _fused_qkv_attention_forward


class FusedQKVViTAttention(ViTAttention):
    """`ViTAttention` with one query-key-value GEMM (the same parameters)."""

    eager_attention = staticmethod(modeling_vit.eager_attention_forward)
    separate_forward = ViTAttention.forward
    forward = _fused_qkv_attention_forward


_FUSED = {BeitAttention: FusedQKVBeitAttention, ViTAttention: FusedQKVViTAttention}
_SEPARATE = {fused: separate for separate, fused in _FUSED.items()}


def _switch_classes(module: nn.Module, classes: dict[type, type]) -> int:
    """Gives every submodule whose exact class is a key of ``classes`` the matching class (in place: parameters,
    buffers and hooks stay). Returns how many were switched."""
    switched = 0
    for child in module.modules():
        target = classes.get(type(child))
        if target is not None:
            child.__class__ = target
            switched += 1
    return switched


def use_fused_qkv_projection(module: nn.Module) -> int:
    """Switches every transformers BEiT/ViT attention under ``module`` to the fused projection (only the class
    changes). Returns how many were switched."""
    return _switch_classes(module, _FUSED)


def use_separate_qkv_projections(module: nn.Module) -> int:
    """The inverse of `use_fused_qkv_projection`: transformers' own three projections (the plain baseline, A/Bs)."""
    return _switch_classes(module, _SEPARATE)
