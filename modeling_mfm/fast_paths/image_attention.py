"""SDPA for image encoders that never builds an attention mask, so that ``torch.compile`` keeps the fused kernels.

Why: transformers' BEiT and ViT ask ``create_bidirectional_mask`` for a mask, which is skipped (None) unless
``torch.compiler.is_exporting()`` is true. torch 2.7 to 2.13 report it true under plain ``torch.compile`` as well
(pytorch#176347, fixed in 2.14), so a compiled encoder gets an all-True (B, 1, N, N) mask; flash and cuDNN attention
refuse masks and SDPA falls back to its math kernel (bmm + softmax, partly in float32): the compiled step then
runs slower than the eager one (docs/performance.md).

Images have no padding: every patch attends to every patch. The implementation registered here, ``IMAGE_SDPA``, is
transformers' own SDPA attention with a mask function that returns no mask unless a padding mask is given (then the
usual SDPA mask). Relative position biases (BEiT) are added by the layers themselves and are unaffected.

The caller's config is never changed: each encoder (and every module that shares its config) gets a private copy of
its config that names ``IMAGE_SDPA``; the undo gives the original object back.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

from torch import nn

from .registry import MissingInternal, vit_encoders

__all__ = ["IMAGE_SDPA", "image_attention_implementation", "register", "use_mask_free_sdpa"]

IMAGE_SDPA = "mfm_image_sdpa"


def image_attention_implementation(requested: str | None) -> str | None:
    """The attention implementation the fast path gives an encoder whose config asks for ``requested``: SDPA becomes
    `IMAGE_SDPA` (the same kernels, never a materialised mask); any other choice (eager, flex, a Hub kernel) stays."""
    return IMAGE_SDPA if requested in (None, "sdpa") else requested


def register() -> None:
    """Registers `IMAGE_SDPA` with transformers' attention and mask interfaces (idempotent)."""
    try:
        from transformers import AttentionInterface
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    except ImportError as error:
        raise MissingInternal(f"transformers' SDPA attention or mask internals are missing ({error})") from None

    def image_sdpa_mask(*args: Any, attention_mask: Any = None, **kwargs: Any) -> Any:
        """No mask for unpadded inputs (the fused SDPA kernels stay usable); a padding mask is honoured as usual."""
        if attention_mask is None:
            return None
        return sdpa_mask(*args, attention_mask=attention_mask, **kwargs)

    AttentionInterface.register(IMAGE_SDPA, sdpa_attention_forward)
    AttentionMaskInterface.register(IMAGE_SDPA, image_sdpa_mask)


def _uses_attention_interface(encoder: nn.Module) -> bool:
    """Whether the encoder's attention layers pick their kernel from the config at run time (transformers' current
    layout: ``q_proj``... on an attention module that holds the config)."""
    return any(hasattr(module, "q_proj") and getattr(module, "config", None) is encoder.config
               for module in encoder.modules())


def use_mask_free_sdpa(model: nn.Module) -> tuple[int, Callable[[], None]]:
    """Gives every BEiT/ViT encoder under ``model`` that runs SDPA a private config naming `IMAGE_SDPA`. Returns how
    many encoders, and the undo."""
    encoders = [e for e in vit_encoders(model) if e.config._attn_implementation in (None, "sdpa")]
    if not encoders:
        return 0, lambda: None
    for encoder in encoders:
        if not _uses_attention_interface(encoder):
            raise MissingInternal(f"{type(encoder).__name__}'s attention does not read its kernel from the config")
    register()
    swapped: list[tuple[nn.Module, Any, Any]] = []
    for encoder in encoders:
        original = encoder.config
        private = copy.deepcopy(original)
        private._attn_implementation = IMAGE_SDPA
        for module in encoder.modules():
            if getattr(module, "config", None) is original:
                module.config = private
                swapped.append((module, original, private))

    def undo() -> None:
        for module, original, private in swapped:
            if module.config is private:
                module.config = original
                if private._attn_implementation != IMAGE_SDPA:  # changed meanwhile (set_attn_implementation)
                    original._attn_implementation = private._attn_implementation

    return len(encoders), undo
