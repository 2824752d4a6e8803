"""Which changes bring the compiled ViT-B/16 MFM training step to its 3,500 img/s target, and what does each cost in
agreement with float32? One run on a GPU measures them side by side.

Measured on an H100 (torch 2.11, bf16, batch 128, compiled; README "What limits further speed"): the package's
step 2,825 img/s; the bf16 residual stream 2,983 (now the opt-in ``--bf16_residual_stream``); fused QKV 2,853 (+1 %,
left out); flash instead of cuDNN attention 2,847; the bf16 stream with fused QKV 3,006, and 3,198 / 3,233 (with CUDA
graphs) at batch 256. Max-autotune had not finished compiling after 245 s. The profile of that step then showed the
two patch convolutions (the embedding and the decoder head) at about 2.1 ms of its 42 ms; the package now computes
them as GEMMs, and ``conv_patches`` puts the convolutions back for the A/B.

Variants are applied from outside the package (hooks and patched methods), so that nothing changes in it until a
variant has earned its place; join parts with "+" to combine them.

- ``autocast``: the package's step (bf16 autocast; the residual stream stays float32: the embeddings concatenate the
  bf16 patch embeddings with the float32 class token, LayerNorm returns float32, and a residual add of a bf16 branch
  to a float32 stream is float32).
- ``conv_patches``: the patch embedding and the decoder head as cuDNN convolutions, as before they became GEMMs.
- ``bf16_residual``: the package's ``keep_residual_stream_in_bf16`` (``--bf16_residual_stream``): the embeddings'
  output is cast to bf16 once, so that the residual adds run in bf16 and LayerNorm reads bf16.
- ``fused_qkv``: one (768 x 2304) projection for queries, keys and values, as the official and timm ViTs compute
  it, instead of BEiT's three (768 x 768) ones (the weights concatenated on the fly; the same function).
- ``flash`` / ``cudnn`` / ``efficient``: force that SDPA kernel (the default on an H100 is cuDNN's).
- ``max_autotune``: Inductor's ``max-autotune-no-cudagraphs`` mode (Triton GEMM templates, into which it can fuse
  the bias and GELU epilogues; compilation takes minutes).
- ``cudagraphs``: the ``reduce-overhead`` mode.

    python benchmarks/vit_step_variants.py                       # on a GPU: mfm-vit-base, batch 128, compiled
    python benchmarks/vit_step_variants.py --batch_size 256 --variants autocast bf16_residual+fused_qkv+flash
    python benchmarks/vit_step_variants.py --preset mfm-vit-tiny --batch_size 4 --image_size 64 --device cpu --eager
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import time
from types import MethodType

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers.models.beit.modeling_beit import BeitAttention

from modeling_mfm import MFMConfig, MFMForPreTraining
from modeling_mfm.patch_linear import use_convolution_patch_projection
from modeling_mfm.training.benchmark import profile_steps
from modeling_mfm.training.model_factory import keep_residual_stream_in_bf16
from modeling_mfm.training.monitoring import peak_reserved_bytes
from modeling_mfm.training.optim import build_optimizer
from modeling_mfm.training.plain_step import plain_decode

DEFAULT_VARIANTS = ("conv_patches", "autocast", "bf16_residual", "bf16_residual+cudagraphs")
ATTENTION_KERNELS = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
}
COMPILE_MODES = {"max_autotune": "max-autotune-no-cudagraphs", "cudagraphs": "reduce-overhead"}


def convolution_patches(model: MFMForPreTraining) -> None:
    """The patch embedding and the decoder head as the convolutions of the official code (the package computes them
    as GEMMs, see modeling_mfm/patch_linear.py): the A/B of that change."""
    use_convolution_patch_projection(model.mfm.backbone)
    model.decode = MethodType(plain_decode, model)


def _fused_qkv_forward(
    self: BeitAttention, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs
) -> tuple[torch.Tensor, None]:
    """BeitAttention.forward with the three projections as one GEMM (no relative position bias, no mask: the MFM
    encoders have neither)."""
    key_bias = self.k_proj.bias if self.k_proj.bias is not None else torch.zeros_like(self.q_proj.bias)
    weight = torch.cat((self.q_proj.weight, self.k_proj.weight, self.v_proj.weight))
    bias = torch.cat((self.q_proj.bias, key_bias, self.v_proj.bias))
    batch, tokens, _ = hidden_states.shape
    qkv = F.linear(hidden_states, weight, bias).view(batch, tokens, 3, -1, self.head_dim)
    query, key, value = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, N, head_dim)
    dropout = self.attention_dropout if self.training else 0.0
    attended = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=dropout,
                                              scale=self.scaling)
    return self.o_proj(attended.transpose(1, 2).reshape(batch, tokens, -1)), None


def fuse_qkv_projections(model: MFMForPreTraining) -> None:
    for module in model.modules():
        if isinstance(module, BeitAttention):
            module.forward = MethodType(_fused_qkv_forward, module)


PATCHES = {
    "bf16_residual": keep_residual_stream_in_bf16,
    "fused_qkv": fuse_qkv_projections,
    "conv_patches": convolution_patches,
}


def parse_variant(name: str) -> tuple[list, SDPBackend | None, str | None]:
    """"bf16_residual+fused_qkv+flash" -> (model patches, forced attention kernel, compile mode)."""
    patches, kernel, mode = [], None, None
    for part in name.split("+"):
        if part in PATCHES:
            patches.append(PATCHES[part])
        elif part in ATTENTION_KERNELS:
            kernel = ATTENTION_KERNELS[part]
        elif part in COMPILE_MODES:
            mode = COMPILE_MODES[part]
        elif part != "autocast":
            known = ["autocast", *PATCHES, *ATTENTION_KERNELS, *COMPILE_MODES]
            raise SystemExit(f"unknown variant part {part!r}; known: {', '.join(known)}")
    return patches, kernel, mode


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="mfm-vit-base")
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--eager", action="store_true", help="Time the eager step instead of the compiled one.")
    parser.add_argument("--profile_dir", help="Write each variant's torch.profiler table (three steps) here.")
    args = parser.parse_args()
    variants = {name: parse_variant(name) for name in args.variants}  # refuses typos before any work
    device = torch.device(args.device)
    config = MFMConfig.from_preset(args.preset, image_size=args.image_size)
    torch.manual_seed(0)
    initial = MFMForPreTraining(config).state_dict()
    pixel_values = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device)

    def fresh_model() -> MFMForPreTraining:
        model = MFMForPreTraining(config)
        model.load_state_dict(initial)
        return model.to(device).train()

    model = fresh_model()
    with torch.no_grad():
        mask = model(pixel_values=pixel_values).frequency_mask
    reference_loss, reference = loss_and_gradient(model, pixel_values[:8], mask[:8], autocast=False)
    del model
    cosine = torch.nn.functional.cosine_similarity
    print(f"{args.preset}, batch {args.batch_size}, {args.image_size} px, {device}, torch {torch.__version__}, "
          f"{'eager' if args.eager else 'compiled'}")
    print(f"float32 loss {reference_loss:.6f} (agreement on the first 8 images)", flush=True)
    for name, (patches, kernel, mode) in variants.items():
        model = fresh_model()
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
    main()
