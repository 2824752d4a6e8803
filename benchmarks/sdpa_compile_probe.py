"""Which attention kernels does the compiled ViT-B/16 MFM step accept on CUDA, and how fast is its forward + backward
with each? Without `modeling_mfm.fast_paths` (``--no_fast_paths``) the compiled step passes an attention mask that
flash and cuDNN attention refuse while tracing, and SDPA falls back to its math kernel; with the fast paths'
mask-free SDPA the forced kernels compile.

    python benchmarks/sdpa_compile_probe.py
    python benchmarks/sdpa_compile_probe.py --no_fast_paths
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from modeling_mfm import MFMConfig, MFMForPreTraining
from modeling_mfm.cli import ScriptArgumentParser, ScriptError, run_script
from modeling_mfm.fast_paths import apply_fast_paths

# (name, forced kernels or None for SDPA's choice, compiled)
VARIANTS = (
    ("default", None, False),
    ("flash", [SDPBackend.FLASH_ATTENTION], False),
    ("flash", [SDPBackend.FLASH_ATTENTION], True),
    ("cudnn", [SDPBackend.CUDNN_ATTENTION], True),
)


@dataclass
class ProbeArguments:
    per_device_train_batch_size: int = field(default=128, metadata={"help": "Images per step (224 px, mfm-vit-base)."})
    steps: int = field(default=10, metadata={"help": "Timed forward + backward passes per variant."})
    fast_paths: bool = field(
        default=True, metadata={"help": "Apply modeling_mfm.fast_paths; --no_fast_paths probes the stock model."}
    )


def probe_eager_kernels(batch_size: int, device: torch.device) -> None:
    """Which fused kernels accept the step's attention inputs (eager, no mask)."""
    queries = torch.randn(batch_size, 197, 768, device=device, dtype=torch.bfloat16, requires_grad=True)
    heads = queries.view(batch_size, 197, 12, 64).transpose(1, 2)
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):
        try:
            with sdpa_kernel(backend):
                F.scaled_dot_product_attention(heads, heads, heads).sum().backward()
            print("eager", backend.name, "ok", flush=True)
        except Exception as error:  # noqa: BLE001 -- a refused kernel is the answer, not a failure
            print("eager", backend.name, "REFUSED", str(error).replace("\n", " ")[:400], flush=True)


def images_per_second(run: Callable[[], None], batch_size: int, steps: int) -> float:
    for _ in range(3):
        run()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        run()
    torch.cuda.synchronize()
    return batch_size * steps / (time.perf_counter() - start)


def main(argv: Sequence[str] | None = None) -> None:
    parser = ScriptArgumentParser(ProbeArguments, prog="sdpa_compile_probe.py", description=__doc__)
    (args,) = parser.parse_args_into_dataclasses(argv)
    if not torch.cuda.is_available():
        raise ScriptError("this probe needs a CUDA device")
    device = torch.device("cuda")
    probe_eager_kernels(args.per_device_train_batch_size, device)
    model = MFMForPreTraining(MFMConfig.from_preset("mfm-vit-base"))
    if args.fast_paths:
        apply_fast_paths(model)
    model = model.to(device).train()
    pixel_values = torch.randn(args.per_device_train_batch_size, 3, 224, 224, device=device)

    def forward_backward(module: torch.nn.Module) -> Callable[[], None]:
        def run() -> None:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = module(pixel_values=pixel_values).loss
            loss.backward()
            model.zero_grad(set_to_none=True)
        return run

    for name, backends, compiled in VARIANTS:
        torch._dynamo.reset()
        module = torch.compile(model) if compiled else model
        try:
            with sdpa_kernel(backends) if backends is not None else contextlib.nullcontext():
                rate = images_per_second(forward_backward(module), args.per_device_train_batch_size, args.steps)
            print(f"fwd+bwd  attention {name:8s} compiled {compiled!s:5s} {rate:8.1f} img/s", flush=True)
        except Exception as error:  # noqa: BLE001 -- a kernel that fails to compile is reported, the probe goes on
            print(f"fwd+bwd  attention {name:8s} compiled {compiled!s:5s} FAILED {str(error)[:400]}", flush=True)


if __name__ == "__main__":
    sys.exit(run_script(main))
