"""Would a bf16 residual stream bring the compiled ViT-B/16 MFM step to its 3,500 img/s target, and what would it
cost in agreement with float32?

Under bf16 autocast the BEiT/ViT residual stream stays float32: the embeddings concatenate the bf16 patch
embeddings with the float32 class token, LayerNorm returns float32, and each residual add of a bf16 branch to a
float32 stream is float32. So every block reads and writes float32 activations around its GEMMs, which the H100
profile puts at about half of the compiled step (47 ms, of which GEMMs and attention take about 24). This probe casts
the embeddings' output to the autocast dtype (a forward hook, nothing else changes): the residual adds then run in
bf16 and LayerNorm reads bf16. It prints, for the autocast baseline and the bf16 residual, the loss and gradient
agreement with the float32 step on the same batch and masks, and the compiled training step's img/s and peak memory.
The official recipe (fp16 autocast) keeps a float32 stream, so a speed-up here has to be weighed against the
agreement figures before it becomes an option.

    python benchmarks/bf16_residual_probe.py                       # on a GPU: mfm-vit-base, batch 128, compiled
    python benchmarks/bf16_residual_probe.py --preset mfm-vit-tiny --batch_size 4 --image_size 64 --device cpu
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from modeling_mfm import MFMConfig, MFMForPreTraining
from modeling_mfm.training.optim import build_optimizer


def cast_residual_stream(model: MFMForPreTraining) -> torch.utils.hooks.RemovableHandle:
    """Makes the encoder's residual stream the autocast dtype: the embeddings' output is cast once."""

    def cast(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        kind = output.device.type
        return output.to(torch.get_autocast_dtype(kind)) if torch.is_autocast_enabled(kind) else output

    return model.mfm.backbone.embeddings.register_forward_hook(cast)


def loss_and_gradient(model, pixel_values, mask, autocast: bool) -> tuple[float, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    with torch.autocast(pixel_values.device.type, dtype=torch.bfloat16, enabled=autocast):
        loss = model(pixel_values=pixel_values, frequency_mask=mask).loss
    loss.backward()
    gradient = torch.cat([p.grad.double().flatten() for p in model.parameters() if p.grad is not None])
    return float(loss.detach()), gradient


def step_rate(model, pixel_values, steps: int, compile_model: bool) -> tuple[float, float]:
    """img/s (median step) and peak memory in GiB (CUDA) of the bf16 training step with fused AdamW."""
    optimizer = build_optimizer(model, lr=1e-4)
    runner = torch.compile(model) if compile_model else model
    device = pixel_values.device
    synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = runner(pixel_values=pixel_values).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 3.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    synchronize()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        synchronize()
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    return pixel_values.shape[0] / statistics.median(times), peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="mfm-vit-base")
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--eager", action="store_true", help="Time the eager step instead of the compiled one.")
    args = parser.parse_args()
    device = torch.device(args.device)
    config = MFMConfig.from_preset(args.preset, image_size=args.image_size)
    torch.manual_seed(0)
    model = MFMForPreTraining(config).to(device).train()
    initial = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    pixel_values = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device)
    with torch.no_grad():
        mask = model(pixel_values=pixel_values).frequency_mask
    reference_loss, reference = loss_and_gradient(model, pixel_values[:8], mask[:8], autocast=False)
    cosine = torch.nn.functional.cosine_similarity
    print(f"{args.preset}, batch {args.batch_size}, {args.image_size} px, {device}, torch {torch.__version__}")
    print(f"float32 loss {reference_loss:.6f} (agreement on the first 8 images)")
    for name in ("bf16 autocast", "bf16 autocast + bf16 residual stream"):
        model.load_state_dict(initial)
        hook = cast_residual_stream(model) if "residual" in name else None
        loss, gradient = loss_and_gradient(model, pixel_values[:8], mask[:8], autocast=True)
        rate, peak = step_rate(model, pixel_values, args.steps, compile_model=not args.eager)
        print(f"{name:38s} loss {loss:.6f} (rel. diff. {abs(loss - reference_loss) / abs(reference_loss):.1e}), "
              f"gradient cosine {float(cosine(gradient, reference, dim=0)):.5f}, "
              f"{'eager' if args.eager else 'compiled'} step {rate:,.0f} img/s"
              + (f", peak {peak:.1f} GiB" if device.type == "cuda" else ""), flush=True)
        if hook is not None:
            hook.remove()
        torch._dynamo.reset()


if __name__ == "__main__":
    main()
