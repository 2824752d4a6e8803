"""The plain float32 formulation of the MFM pre-training step: the baseline `benchmark_training_step` times the
package's step against (``benchmarks/benchmark.py --plain_baseline``).

Plain means what a direct port of the official code computes: a low- or high-pass choice per image drawn on the host
and the keep-masks built there (`official_reference.frequency_mask`), corruption and loss in complex arithmetic with
shifted spectra (`official_reference`), attention as matmul + softmax (transformers' eager implementation), the patch
embedding and the decoder as convolutions (a patch convolution, a 1x1 convolution and PixelShuffle), float32
everywhere, no channels_last, and ``torch.optim.AdamW`` looping over the parameters. Model, weights and loss value are
those of the package's step, so the two time the same computation: only its formulation differs.
"""

from __future__ import annotations

import copy
import math
import random
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from modeling_mfm import MFMForPreTraining
from modeling_mfm.conversion import official_reference as reference
from modeling_mfm.training.models.model_factory import enable_activation_checkpointing

__all__ = ["plain_config", "plain_decode", "plain_keep_masks", "plain_model", "plain_pretraining_loss",
           "plain_training_step"]


def plain_config(config: Any) -> Any:
    """A copy of an MFM config whose encoder (and transformer decoder) attend with eager matmul + softmax."""
    if config.corruption != "mfm":
        raise ValueError(f"the plain baseline is the frequency-masking step; corruption is {config.corruption!r}")
    if config.patch_factor != 1:
        raise ValueError(f"the plain baseline supports the official patch_factor 1, got {config.patch_factor}")
    if config.decoder_depth != 0:
        raise ValueError(f"the plain baseline times the official light decoder (decoder_depth 0), got "
                         f"{config.decoder_depth}")
    config = copy.deepcopy(config)
    config._attn_implementation = "eager"
    return config


def plain_model(config: Any) -> MFMForPreTraining:
    """The package's model under `plain_config`, without `modeling_mfm.fast_paths`: the ViT patch embedding a
    convolution and the attention projecting queries, keys and values separately, as transformers builds them."""
    return MFMForPreTraining(plain_config(config))


def plain_decode(model: MFMForPreTraining, features: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The official light decoder on the encoder's output: the features as an (B, D, h, w) map, a 1x1 convolution,
    then PixelShuffle."""
    config = model.config
    if config.is_vit:
        patches = features[:, 1:]
        stride = config.encoder_stride
        features = patches.transpose(1, 2).reshape(patches.shape[0], -1, height // stride, width // stride)
    elif hasattr(model.mfm.backbone, "layernorm"):  # ConvNeXt: its final LayerNorm per position
        features = model.mfm.backbone.layernorm(features.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    projection = model.decoder.projection
    return F.pixel_shuffle(F.conv2d(features, projection.weight, projection.bias), config.encoder_stride)


def plain_keep_masks(config: Any, batch_size: int, rng: random.Random) -> torch.Tensor:
    """Keep-masks (B, S, S) on the host, one low- or high-pass choice per image as the official data loader draws
    them."""
    outer = config.mask_outer_radius if config.mask_outer_radius is not None else math.inf
    low_pass = [rng.random() < config.low_pass_probability for _ in range(batch_size)]
    return reference.frequency_mask(config.image_size, config.mask_radius, outer, low_pass)


def plain_pretraining_loss(model: Any, images: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """The MFM loss of ``model`` (an `MFMForPreTraining`) on [0, 1] images (B, C, S, S) with the keep-masks
    ``keep`` (B, S, S), computed the official way around the model's encoder and decoder."""
    config = model.config
    mean = torch.tensor(config.image_mean, device=images.device).view(1, -1, 1, 1)
    std = torch.tensor(config.image_std, device=images.device).view(1, -1, 1, 1)
    corrupted = reference.frequency_transform(images, keep)
    features = model.mfm((corrupted - mean) / std, return_dict=True).last_hidden_state
    reconstruction = plain_decode(model, features, images.shape[-2], images.shape[-1])
    target = (images - mean) / std
    removed = keep if config.loss_on == "masked" else None
    return reference.frequency_loss(reconstruction, target, removed, **reference.loss_options(config))


def plain_training_step(
    config: Any, images: torch.Tensor, gradient_checkpointing: bool = False
) -> Callable[[], torch.Tensor]:
    """One training step of the plain formulation on ``images`` (uint8 (B, C, S, S), on the device to run on), as a
    function returning the loss: the model built after ``torch.manual_seed(0)`` (the weights the package's
    benchmark starts from), masks drawn on the host, loss, backward, clipping at 3, for-loop AdamW. No autocast and
    no Accelerate: float32, whatever precision the process's other steps use."""
    device = images.device
    torch.manual_seed(0)
    model = plain_model(config).to(device).train()
    if gradient_checkpointing:
        enable_activation_checkpointing(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05, foreach=False)
    host_rng = random.Random(0)

    def step() -> torch.Tensor:
        keep = plain_keep_masks(config, images.shape[0], host_rng).to(device)
        loss = plain_pretraining_loss(model, images.float() / 255.0, keep)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 3.0, foreach=False)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return step
