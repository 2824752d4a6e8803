"""Opt-in speed-ups for a built MFM model, applied by the training, fine-tuning and benchmark scripts.

The model classes (what a checkpoint ships as remote code) compute MFM with transformers' public API only. The
fast paths reformulate parts of that computation for speed, with the same parameters and the same function (up to
the order of floating-point sums), and lean on transformers internals to do so. They are therefore a separate,
explicit and reversible step::

    from modeling_mfm.fast_paths import apply_fast_paths
    fast = apply_fast_paths(model)   # logs one line: what was switched
    ...
    fast.remove()                    # or remove_fast_paths(model): the stock model again

What they switch (see docs/performance.md for measurements):

* ``mask_free_sdpa``: BEiT/ViT encoders run transformers' SDPA with no materialised attention mask, so compiled
  steps keep the flash/cuDNN kernels (`image_attention`). Each encoder gets a private copy of its config; the
  caller's config object is never changed.
* ``patch_gemm``: the ViT patch-embedding convolution as one GEMM (`patch_linear`).
* ``decoder_gemm``: the decoder's 1x1 convolution before PixelShuffle as one GEMM on channel-last features.
* ``fused_qkv``: queries, keys and values from one GEMM, on CUDA (`qkv_projection`).
* ``unit_layer_scale``: BEiT's switched-off layer scale (a multiply by 1.0) skipped (`layer_scale`).
* ``bf16_residual_stream`` (off by default, changes numerics): the ViT residual stream in bf16 under bf16 autocast
  (`residual_stream`; ViT encoders only: another model is refused before anything is switched).

Layers that carry a forward hook, an adapter (PEFT's LoRA) or a subclass keep their own forward. When a
transformers release lacks an internal a path needs, that path is left off with one warning and the model keeps
transformers' forward there.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

from torch import nn

from .image_attention import use_mask_free_sdpa
from .layer_scale import skip_unit_layer_scales
from .patch_linear import use_gemm_decoder_projection, use_gemm_patch_embeddings
from .qkv_projection import fuse_qkv_projections
from .registry import MissingInternal, vit_encoders
from .residual_stream import check_vit_encoder, keep_residual_stream_in_bf16

__all__ = ["FAST_PATHS", "FastPaths", "apply_fast_paths", "remove_fast_paths"]

logger = logging.getLogger(__name__)

FAST_PATHS = ("mask_free_sdpa", "patch_gemm", "decoder_gemm", "fused_qkv", "unit_layer_scale", "bf16_residual_stream")
_APPLIED: weakref.WeakKeyDictionary[nn.Module, FastPaths] = weakref.WeakKeyDictionary()


@dataclass
class FastPaths:
    """What `apply_fast_paths` did to a model: ``switched`` (path -> number of modules), ``unavailable`` (path ->
    why this transformers release cannot run it), and `remove` to undo it."""

    model_name: str
    switched: dict[str, int] = field(default_factory=dict)
    unavailable: dict[str, str] = field(default_factory=dict)
    _undo: list[Callable[[], None]] = field(default_factory=list, repr=False)
    _model: weakref.ref | None = field(default=None, repr=False)  # weak: the registry is keyed by the model

    def summary(self) -> str:
        switched = ", ".join(f"{name} x{count}" for name, count in self.switched.items() if count) or "nothing"
        return f"fast paths on {self.model_name}: {switched}"

    def remove(self) -> None:
        """Undoes every switch (in reverse order): the model computes with transformers' stock forward again."""
        for undo in reversed(self._undo):
            undo()
        self._undo.clear()
        self.switched.clear()
        model = self._model() if self._model is not None else None
        if model is not None and _APPLIED.get(model) is self:
            del _APPLIED[model]


def apply_fast_paths(
    model: nn.Module,
    *,
    mask_free_sdpa: bool = True,
    patch_gemm: bool = True,
    decoder_gemm: bool = True,
    fused_qkv: bool = True,
    unit_layer_scale: bool = True,
    bf16_residual_stream: bool = False,
) -> FastPaths:
    """Switches the chosen fast paths on in ``model`` (an MFM model, or any module holding one) and returns the
    handle that undoes them. Applying twice returns the first handle."""
    if model in _APPLIED:
        logger.info("fast paths already applied to %s", type(model).__name__)
        return _APPLIED[model]
    if bf16_residual_stream:
        check_vit_encoder(model)
    has_vit = any(True for _ in vit_encoders(model))
    steps: dict[str, Callable[[nn.Module], tuple[int, Callable[[], None]]]] = {}
    if mask_free_sdpa and has_vit:
        steps["mask_free_sdpa"] = use_mask_free_sdpa
    if patch_gemm and has_vit:
        steps["patch_gemm"] = use_gemm_patch_embeddings
    if decoder_gemm:
        steps["decoder_gemm"] = use_gemm_decoder_projection
    if fused_qkv and has_vit:
        steps["fused_qkv"] = fuse_qkv_projections
    if unit_layer_scale:
        steps["unit_layer_scale"] = skip_unit_layer_scales
    if bf16_residual_stream:
        steps["bf16_residual_stream"] = keep_residual_stream_in_bf16
    handle = FastPaths(type(model).__name__, _model=weakref.ref(model))
    for name, step in steps.items():
        try:
            count, undo = step(model)
        except MissingInternal as missing:
            handle.unavailable[name] = str(missing)
            continue
        handle.switched[name] = count
        handle._undo.append(undo)
    if handle.unavailable:
        import transformers

        reasons = "; ".join(f"{name}: {reason}" for name, reason in handle.unavailable.items())
        logger.warning("fast paths left off with transformers %s (the stock forward runs there): %s",
                       transformers.__version__, reasons)
    logger.info(handle.summary())
    _APPLIED[model] = handle
    return handle


def remove_fast_paths(model: nn.Module) -> bool:
    """Undoes `apply_fast_paths` on ``model``. Returns whether there was anything to undo."""
    handle = _APPLIED.get(model)
    if handle is None:
        return False
    handle.remove()
    return True
