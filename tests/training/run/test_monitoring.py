"""Peak memory: on the CPU (Linux) the resident-set peak restarts for each benchmark setting."""

from __future__ import annotations

import os

import pytest
import torch

from modeling_mfm.training.run.monitoring import peak_memory_bytes, reset_peak_memory


@pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK), reason="the RSS peak resets on Linux only")
def test_cpu_peak_restarts_after_a_reset():
    block = torch.ones(2**27)  # 512 MiB, written: resident
    with_block = peak_memory_bytes("cpu")
    del block
    reset_peak_memory("cpu")
    after_reset = peak_memory_bytes("cpu")
    assert with_block - after_reset > 400 * 2**20
    small = torch.ones(2**24)  # 64 MiB
    assert after_reset <= peak_memory_bytes("cpu") < with_block
    del small


@pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK), reason="the RSS peak resets on Linux only")
def test_cpu_peak_restart_also_drops_what_the_c_allocator_kept():
    # 4,096 blocks of 64 KiB come from the C heap, which keeps them resident after they are freed
    blocks = [torch.ones(2**14) for _ in range(4096)]
    with_blocks = peak_memory_bytes("cpu")
    del blocks
    reset_peak_memory("cpu")
    assert with_blocks - peak_memory_bytes("cpu") > 200 * 2**20
