"""Does the fast training step compute what the plain one does? One batch, the same weights and the same frequency
masks, through the plain path (float32, eager) and the fast path (`modeling_mfm.fast_paths`, mixed-precision
autocast, SDPA/flash attention, channels_last for CNNs, optionally ``torch.compile``): the losses and the gradients
must agree within the low precision's tolerance. How close the gradients can be depends on the network: the result
also holds the cosine between the plain gradient and the plain gradient of the input rounded to the low precision,
the yardstick.

The masks are drawn once and passed to both paths, because a compiled graph draws its random numbers with its own
generator (a different mask would make the losses differ for no fault of the fast path).
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from modeling_mfm.fast_paths import apply_fast_paths
from modeling_mfm.training.data.transforms import normalize_on_device
from modeling_mfm.training.models.model_factory import preferred_memory_format

__all__ = ["fast_path_agreement"]

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _loss_and_gradient(model: torch.nn.Module, pixel_values: torch.Tensor, mask: torch.Tensor,
                       dtype: torch.dtype | None) -> tuple[float, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    with torch.autocast(pixel_values.device.type, dtype=dtype, enabled=dtype is not None):
        loss = model(pixel_values=pixel_values, frequency_mask=mask, return_dict=True).loss
    loss.backward()
    gradient = torch.cat([p.grad.double().flatten() for p in model.parameters() if p.grad is not None])
    return float(loss.detach()), gradient


def fast_path_agreement(
    config: Any,
    batch_size: int = 8,
    mixed_precision: str = "bf16",
    torch_compile: bool = False,
    compile_backend: str = "inductor",
    device: torch.device | str | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Loss and gradient of one batch by the plain and the fast path. Returns both losses, their relative
    difference, the relative difference of the gradient norms and the cosine similarity of the gradients."""
    from modeling_mfm import MFMForPreTraining

    if config.corruption != "mfm":
        raise ValueError(f"the check draws frequency masks: it needs corruption 'mfm', got {config.corruption!r}")
    if mixed_precision not in ("no", *_DTYPES):
        raise ValueError(f"mixed_precision must be no, bf16 or fp16, got {mixed_precision!r}")
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(seed)
    plain_config = copy.deepcopy(config)
    plain_config._attn_implementation = "eager"
    plain = MFMForPreTraining(plain_config).to(device).train()
    fast = MFMForPreTraining(config).train()
    fast.load_state_dict(plain.state_dict())
    apply_fast_paths(fast)
    fast.to(device, memory_format=preferred_memory_format(config, device))
    generator = torch.Generator(device="cpu").manual_seed(seed)
    images = torch.randint(0, 256, (batch_size, config.num_channels, config.image_size, config.image_size),
                           dtype=torch.uint8, generator=generator).to(device)
    pixel_values = normalize_on_device(images, config.image_mean, config.image_std)
    with torch.no_grad():
        mask = plain(pixel_values=pixel_values, return_dict=True).frequency_mask
    plain_loss, plain_gradient = _loss_and_gradient(plain, pixel_values, mask, None)
    low = _DTYPES.get(mixed_precision)
    # the plain path's own sensitivity: its gradient when only the input is rounded to the low precision (a deep
    # CNN at initialisation is chaotic: a 1e-3 relative change of its weights turns its gradient by ~55 degrees)
    _, rounded_gradient = _loss_and_gradient(plain, pixel_values.to(low).float() if low else pixel_values, mask, None)
    runner = torch.compile(fast, backend=compile_backend) if torch_compile else fast
    fast_loss, fast_gradient = _loss_and_gradient(runner, pixel_values, mask, low)
    cosine = torch.nn.functional.cosine_similarity
    return {
        "device": str(device),
        "mixed_precision": mixed_precision,
        "torch_compile": torch_compile,
        "attention": getattr(config, "_attn_implementation", None),
        "loss_plain": plain_loss,
        "loss_fast": fast_loss,
        "loss_relative_difference": abs(fast_loss - plain_loss) / abs(plain_loss),
        "grad_norm_relative_difference": float(
            (fast_gradient.norm() - plain_gradient.norm()).abs() / plain_gradient.norm()
        ),
        "grad_cosine_similarity": float(cosine(fast_gradient, plain_gradient, dim=0)),
        "grad_cosine_similarity_input_rounded": float(cosine(rounded_gradient, plain_gradient, dim=0)),
    }
