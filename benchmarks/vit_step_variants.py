"""Which changes make the compiled ViT-B/16 MFM training step faster, and what does each cost in agreement with
float32? One run on a GPU measures them side by side (figures: docs/performance.md).

Variants are applied from outside the package (hooks, patched methods and the package's own switches), so that
nothing changes in it until a variant has earned its place; join parts with "+" to combine them.

- ``autocast``: the package's step (bf16 autocast; the residual stream stays float32: the embeddings concatenate the
  bf16 patch embeddings with the float32 class token, LayerNorm returns float32, and a residual add of a bf16 branch
  to a float32 stream is float32).
- ``conv_patches``: the patch embedding and the decoder head as cuDNN convolutions, as before they became GEMMs.
- ``complex_fft``: the corruption and the loss with complex FFTs of the whole spectrum, as before the package used
  the real-input FFTs (half the spectrum; the other half of ``|F|²`` by symmetry).
- ``bf16_residual``: the package's fast path ``bf16_residual_stream`` (``--bf16_residual_stream``): the embeddings'
  output is cast to bf16 once, so that the residual adds run in bf16 and LayerNorm reads bf16.
- ``separate_qkv``: BEiT's three (768 x 768) projections for queries, keys and values, as transformers computes
  them, instead of the package's one (768 x 2304) GEMM (modeling_mfm/fast_paths/qkv_projection.py).
- ``flash`` / ``cudnn`` / ``efficient``: force that SDPA kernel (otherwise SDPA picks one).
- ``max_autotune``: Inductor's ``max-autotune-no-cudagraphs`` mode (Triton GEMM templates, into which it can fuse
  the bias and GELU epilogues; compilation takes minutes).
- ``cudagraphs``: the ``reduce-overhead`` mode.

    python benchmarks/vit_step_variants.py                       # on a GPU: mfm-vit-base, batch 128, compiled
    python benchmarks/vit_step_variants.py --per_device_train_batch_size 512 \
        --variants autocast bf16_residual+cudagraphs+flash
    python benchmarks/vit_step_variants.py --preset mfm-vit-tiny --per_device_train_batch_size 4 --image_size 64 \
        --device cpu --eager
"""

from __future__ import annotations

import contextlib
import os
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import MethodType

import torch
from plain_step import plain_decode
from step_benchmark import profile_steps
from torch.nn.attention import SDPBackend, sdpa_kernel

from modeling_mfm import FrequencyLoss, MFMConfig, MFMForPreTraining
from modeling_mfm.cli import ScriptArgumentParser, run_script
from modeling_mfm.fast_paths import apply_fast_paths
from modeling_mfm.training.optim.optimizer import build_optimizer
from modeling_mfm.training.run.monitoring import peak_reserved_bytes

DEFAULT_VARIANTS = ("conv_patches+complex_fft+separate_qkv", "separate_qkv", "autocast", "bf16_residual",
                    "bf16_residual+cudagraphs")
ATTENTION_KERNELS = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
}
COMPILE_MODES = {"max_autotune": "max-autotune-no-cudagraphs", "cudagraphs": "reduce-overhead"}


def convolution_patches(model: MFMForPreTraining) -> None:
    """The decoder head as the convolution of the official code, on an (B, D, h, w) map (the package computes it as
    a GEMM on channel-last features): the A/B of that change, with the fast path ``patch_gemm`` left off."""
    model.decode = MethodType(plain_decode, model)


def _complex_fft_corrupt(
    self: MFMForPreTraining, pixel_values: torch.Tensor, frequency_mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """MFMForPreTraining.corrupt with the complex FFTs of the whole spectrum, as before the real-input FFTs."""
    with torch.autocast(pixel_values.device.type, enabled=False):
        images = self.unnormalize(pixel_values.float())
        batch, _, height, width = pixel_values.shape
        if frequency_mask is None:
            frequency_mask = self.sample_frequency_mask(batch, height, width, pixel_values.device)
        keep = torch.fft.ifftshift(frequency_mask.float(), dim=(-2, -1))[:, None]
        spectrum = torch.view_as_real(torch.fft.fft2(images))
        corrupted = torch.fft.ifft2(torch.view_as_complex(spectrum * keep[..., None])).real.clamp(0.0, 1.0)
        return self.normalize(corrupted).to(pixel_values.dtype), frequency_mask


def _complex_fft_loss(
    self: FrequencyLoss, pred: torch.Tensor, target: torch.Tensor, matrix: torch.Tensor | None = None
) -> torch.Tensor:
    """FrequencyLoss.forward with the complex FFT of the whole spectrum, as before the real-input FFT."""
    with torch.autocast(pred.device.type, enabled=False):
        residual = pred.float() - target.float()
        if self.ave_spectrum:
            residual = residual.mean(0, keepdim=True)
        difference = torch.view_as_real(torch.fft.fft2(self._patches(residual), norm="ortho"))
        dist2 = torch.fft.fftshift(difference.square().sum(-1), dim=(-2, -1))
        loss = torch.sqrt(dist2 + 1e-12) ** self.loss_gamma
        return self._weight_matrix(dist2, matrix) * loss if self.with_matrix else loss


def complex_ffts(model: MFMForPreTraining) -> None:
    """The corruption and the loss with complex FFTs of the whole spectrum: the A/B of the real-input FFTs."""
    model.corrupt = MethodType(_complex_fft_corrupt, model)
    model.frequency_loss.forward = MethodType(_complex_fft_loss, model.frequency_loss)


PATCHES = {
    "bf16_residual": lambda model: None,  # a fast path: FAST_PATH_SWITCHES
    "separate_qkv": lambda model: None,
    "conv_patches": convolution_patches,
    "complex_fft": complex_ffts,
}
# the fast paths (modeling_mfm.fast_paths) a variant switches off, or on
FAST_PATH_SWITCHES = {
    "separate_qkv": {"fused_qkv": False},
    "conv_patches": {"patch_gemm": False, "decoder_gemm": False},
    "bf16_residual": {"bf16_residual_stream": True},
}


def parse_variant(name: str) -> tuple[list, SDPBackend | None, str | None, dict]:
    """"bf16_residual+separate_qkv+flash" -> (model patches, forced attention kernel, compile mode, fast-path
    switches)."""
    patches, kernel, mode, off = [], None, None, {}
    for part in name.split("+"):
        if part in PATCHES:
            patches.append(PATCHES[part])
            off.update(FAST_PATH_SWITCHES.get(part, {}))
        elif part in ATTENTION_KERNELS:
            kernel = ATTENTION_KERNELS[part]
        elif part in COMPILE_MODES:
            mode = COMPILE_MODES[part]
        elif part != "autocast":
            known = ["autocast", *PATCHES, *ATTENTION_KERNELS, *COMPILE_MODES]
            raise ValueError(f"unknown variant part {part!r}; known: {', '.join(known)}")
    return patches, kernel, mode, off


@dataclass
class VariantArguments:
    preset: str = field(default="mfm-vit-base", metadata={"help": "MFMConfig preset of the model."})
    per_device_train_batch_size: int = field(default=128, metadata={"help": "Images per step."})
    image_size: int = field(default=224, metadata={"help": "Side of the square images, in pixels."})
    steps: int = field(default=20, metadata={"help": "Timed steps per variant (after 3 untimed ones)."})
    variants: list[str] = field(
        default_factory=lambda: list(DEFAULT_VARIANTS),
        metadata={"help": "Variants to time; join parts with '+' (see the module docstring for the parts)."},
    )
    device: str | None = field(default=None, metadata={"help": "Device (default: cuda when available, else cpu)."})
    eager: bool = field(default=False, metadata={"help": "Time the eager step instead of the compiled one."})
    profile_dir: str | None = field(
        default=None, metadata={"help": "Write each variant's torch.profiler table (three steps) here."}
    )

    def __post_init__(self) -> None:
        for name in self.variants:  # refuses typos before any work
            parse_variant(name)


def loss_and_gradient(model, pixel_values, mask, autocast: bool) -> tuple[float, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    with torch.autocast(pixel_values.device.type, dtype=torch.bfloat16, enabled=autocast):
        loss = model(pixel_values=pixel_values, frequency_mask=mask).loss
    loss.backward()
    gradient = torch.cat([p.grad.double().flatten() for p in model.parameters() if p.grad is not None])
    model.zero_grad(set_to_none=True)
    return float(loss.detach()), gradient


def step_rate(model, pixel_values, steps: int, compile_mode: str | None, eager: bool,
              profile_path: str | None = None) -> dict[str, float]:
    """img/s (median step), warm-up seconds (compilation), peak allocated and peak reserved GiB (CUDA) of the bf16
    training step with fused AdamW, clipping included; with ``profile_path``, the profiler table of three more
    steps."""
    optimizer = build_optimizer(model, lr=1e-4)
    runner = model if eager else torch.compile(model, mode=compile_mode)
    device = pixel_values.device
    synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = runner(pixel_values=pixel_values).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 3.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    start = time.perf_counter()
    for _ in range(3):
        step()
    synchronize()
    warmup = time.perf_counter() - start
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        synchronize()
        times.append(time.perf_counter() - start)
    if profile_path:
        profile_steps(step, device, profile_path)
    result = {"img_per_s": pixel_values.shape[0] / statistics.median(times), "warmup_seconds": warmup}
    if device.type == "cuda":
        result["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        result["reserved_gib"] = peak_reserved_bytes(device) / 2**30
    return result


def main(argv: Sequence[str] | None = None) -> None:
    parser = ScriptArgumentParser(VariantArguments, prog="vit_step_variants.py", description=__doc__)
    (args,) = parser.parse_args_into_dataclasses(argv)
    variants = {name: parse_variant(name) for name in args.variants}
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    config = MFMConfig.from_preset(args.preset, image_size=args.image_size)
    torch.manual_seed(0)
    initial = MFMForPreTraining(config).state_dict()
    pixel_values = torch.randn(args.per_device_train_batch_size, 3, args.image_size, args.image_size, device=device)

    def fresh_model(switches: dict | None = None) -> MFMForPreTraining:
        model = MFMForPreTraining(config)
        model.load_state_dict(initial)
        apply_fast_paths(model, **(switches or {}))
        return model.to(device).train()

    model = fresh_model()
    with torch.no_grad():
        mask = model(pixel_values=pixel_values).frequency_mask
    reference_loss, reference = loss_and_gradient(model, pixel_values[:8], mask[:8], autocast=False)
    del model
    cosine = torch.nn.functional.cosine_similarity
    print(f"{args.preset}, batch {args.per_device_train_batch_size}, {args.image_size} px, {device}, "
          f"torch {torch.__version__}, "
          f"{'eager' if args.eager else 'compiled'}")
    print(f"float32 loss {reference_loss:.6f} (agreement on the first 8 images)", flush=True)
    for name, (patches, kernel, mode, off) in variants.items():
        model = fresh_model(off)
        for patch in patches:
            patch(model)
        try:
            with sdpa_kernel(kernel) if kernel is not None else contextlib.nullcontext():
                loss, gradient = loss_and_gradient(model, pixel_values[:8], mask[:8], autocast=True)
                profile_path = None
                if args.profile_dir:
                    os.makedirs(args.profile_dir, exist_ok=True)
                    profile_path = os.path.join(args.profile_dir, f"vit_step_variant-{name}.txt")
                timing = step_rate(model, pixel_values, args.steps, mode, args.eager, profile_path)
        except Exception as error:  # noqa: BLE001 -- a refused kernel or a failed compile: report, go on
            print(f"{name:40s} FAILED {type(error).__name__}: {str(error).splitlines()[0][:300]}", flush=True)
        else:
            memory = (f", peak {timing['peak_gib']:.1f} GiB (reserved {timing['reserved_gib']:.1f})"
                      if device.type == "cuda" else "")
            print(f"{name:40s} loss {loss:.6f} (rel. diff. {abs(loss - reference_loss) / abs(reference_loss):.1e}), "
                  f"gradient cosine {float(cosine(gradient, reference, dim=0)):.5f}, step {timing['img_per_s']:,.1f} "
                  f"img/s{memory}, warm-up {timing['warmup_seconds']:.0f} s", flush=True)
        del model
        torch._dynamo.reset()
        if device.type == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    sys.exit(run_script(main))
