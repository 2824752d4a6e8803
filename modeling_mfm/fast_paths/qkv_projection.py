"""Queries, keys and values of the ViT/BEiT attention from one (D x 3D) GEMM instead of three (D x D) ones.

Why: transformers' BEiT and ViT attention project queries, keys and values with three ``nn.Linear`` layers; the
official MFM (and timm) ViT computes them as one ``qkv`` projection. One GEMM three times as wide uses the GPU better
and its backward needs one input-gradient GEMM instead of three plus two sums (the gain: docs/performance.md).

The parameters stay the three layers of transformers (the same names and checkpoints); their weights are
concatenated on the fly, which costs a copy of 3·D² weights per layer and step, and autograd splits the gradient
back. The attention itself still goes through transformers' attention interface, so ``attn_implementation``
(SDPA, eager, flex...) and ``output_attentions`` behave as before.

The fused path only reads the three layers' weights, so it is taken only where that is what they compute: plain
``nn.Linear`` layers without hooks. A layer replaced by an adapter (PEFT's LoRA wraps ``q_proj``/``v_proj``), a
quantised subclass, a hooked layer or one whose forward Accelerate wrapped (offloading) sends the attention through
transformers' forward, which calls the layers. Attention modules of a subclass of transformers' class are left alone.

Only on the devices in `FUSED_DEVICE_TYPES` (CUDA): on a CPU the fused step was slower, so there the layers run
transformers' own forward.

This relies on transformers internals (the attention classes of ``modeling_beit``/``modeling_vit``, their
``q_proj``...``o_proj`` layers and ``eager_attention_forward``): `resolve` raises `MissingInternal` when a release
has renamed them, and the caller keeps the stock forward.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .patch_linear import is_plain
from .registry import MissingInternal

__all__ = ["FUSED_DEVICE_TYPES", "fuse_qkv_projections", "resolve"]

FUSED_DEVICE_TYPES = ("cuda",)
_LAYERS = ("q_proj", "k_proj", "v_proj", "o_proj")
_ATTRIBUTES = (*_LAYERS, "head_dim", "scaling", "attention_dropout", "config")


def resolve() -> tuple[Any, dict[type, Callable]]:
    """transformers' attention function registry and {attention class: its eager attention function}."""
    try:
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
        from transformers.models.beit import modeling_beit
        from transformers.models.vit import modeling_vit

        classes = {
            modeling_beit.BeitAttention: modeling_beit.eager_attention_forward,
            modeling_vit.ViTAttention: modeling_vit.eager_attention_forward,
        }
    except (ImportError, AttributeError) as error:
        raise MissingInternal(f"transformers' BEiT/ViT attention internals are missing ({error})") from None
    return ALL_ATTENTION_FUNCTIONS, classes


def _fused_qkv_attention_forward(
    self: nn.Module,
    hidden_states: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The transformers BEiT/ViT attention forward with the three projections computed as one GEMM."""
    projections = (self.q_proj, self.k_proj, self.v_proj)
    if hidden_states.device.type not in FUSED_DEVICE_TYPES or not all(is_plain(p, nn.Linear) for p in projections):
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
    attention_interface = self.attention_functions.get_interface(self.config._attn_implementation,
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


_FUSED_CLASSES: dict[tuple[type, Callable], type] = {}


def fused_class(base: type[nn.Module], eager: Callable, attention_functions: Any) -> type[nn.Module]:
    """``base`` (transformers' BEiT or ViT attention) with one query-key-value GEMM; the same parameters."""
    if (base, eager) not in _FUSED_CLASSES:
        _FUSED_CLASSES[base, eager] = _make_fused_class(base, eager, attention_functions)
    return _FUSED_CLASSES[base, eager]


def _make_fused_class(base: type[nn.Module], eager: Callable, attention_functions: Any) -> type[nn.Module]:
    return type(f"FusedQKV{base.__name__}", (base,), {
        "eager_attention": staticmethod(eager),
        "attention_functions": attention_functions,
        "separate_forward": base.forward,
        "forward": _fused_qkv_attention_forward,
        "__module__": __name__,
        "__doc__": f"`{base.__name__}` with one query-key-value GEMM (the same parameters).",
    })


def fuse_qkv_projections(model: nn.Module) -> tuple[int, Callable[[], None]]:
    """Gives every transformers BEiT/ViT attention under ``model`` (exact class, not a subclass) the fused
    projection; only the class changes (parameters, buffers and hooks stay). Returns how many, and the undo."""
    attention_functions, classes = resolve()
    switched: list[tuple[nn.Module, type]] = []
    targets = [module for module in model.modules() if type(module) in classes]
    for module in targets:
        missing = [name for name in _ATTRIBUTES if not hasattr(module, name)]
        if missing:
            raise MissingInternal(f"{type(module).__name__} has no {missing} (renamed in this transformers release)")
    for module in targets:
        base = type(module)
        module.__class__ = fused_class(base, classes[base], attention_functions)
        switched.append((module, base))

    def undo() -> None:
        for module, base in switched:
            if type(module).__bases__ == (base,) and type(module).__name__ == f"FusedQKV{base.__name__}":
                module.__class__ = base

    return len(switched), undo
