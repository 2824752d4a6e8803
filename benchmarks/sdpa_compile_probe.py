"""Which attention kernels does the compiled ViT-B/16 MFM step accept on CUDA, and how fast is its forward + backward
with each? Seen on an H100 with torch 2.11 before `modeling_mfm.fast_paths.image_attention`: the compiled step ran
the math SDPA (bmm + softmax) and was slower than eager, and forcing flash or cuDNN attention failed while tracing
("Flash Attention does not support non-null attn_mask"). With the encoders on `mfm_image_sdpa`, the forced variants should compile.

    python benchmarks/sdpa_compile_probe.py
"""

import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from modeling_mfm import MFMConfig, MFMForPreTraining

device = torch.device("cuda")
batch = 128

# 1. which fused kernels accept the step's attention inputs (eager)
q = torch.randn(batch, 197, 768, device=device, dtype=torch.bfloat16, requires_grad=True)
heads = q.view(batch, 197, 12, 64).transpose(1, 2)
for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):
    try:
        with sdpa_kernel(backend):
            F.scaled_dot_product_attention(heads, heads, heads).sum().backward()
        print("eager", backend.name, "ok", flush=True)
    except Exception as error:
        print("eager", backend.name, "REFUSED", str(error).replace("\n", " ")[:400], flush=True)

model = MFMForPreTraining(MFMConfig.from_preset("mfm-vit-base")).to(device).train()
x = torch.randn(batch, 3, 224, 224, device=device)


def timed(run, steps=10):
    for _ in range(3):
        run()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        run()
    torch.cuda.synchronize()
    return batch * steps / (time.perf_counter() - start)


def forward_backward(module):
    def run():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = module(pixel_values=x).loss
        loss.backward()
        model.zero_grad(set_to_none=True)
    return run


variants = (
    ("default", None, False),
    ("flash", [SDPBackend.FLASH_ATTENTION], False),
    ("flash", [SDPBackend.FLASH_ATTENTION], True),
    ("cudnn", [SDPBackend.CUDNN_ATTENTION], True),
)
for name, backends, compiled in variants:
    torch._dynamo.reset()
    module = torch.compile(model) if compiled else model
    try:
        if backends is None:
            rate = timed(forward_backward(module))
        else:
            with sdpa_kernel(backends):
                rate = timed(forward_backward(module))
        print(f"fwd+bwd  attention {name:8s} compiled {compiled!s:5s} {rate:8.1f} img/s", flush=True)
    except Exception as error:
        print(f"fwd+bwd  attention {name:8s} compiled {compiled!s:5s} FAILED {str(error)[:400]}", flush=True)
