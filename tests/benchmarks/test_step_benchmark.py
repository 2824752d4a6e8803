"""The benchmark functions behind benchmarks/benchmark.py (tiny settings: they must run and report)."""

from __future__ import annotations

import pytest
from accelerate.state import AcceleratorState
from conftest import load_script, noise_jpegs
from fast_path_check import fast_path_agreement
from step_benchmark import (
    benchmark_input_pipeline,
    benchmark_training_step,
    benchmark_transform_stages,
    training_flops_per_image,
)


def benchmark_cli(argv: list[str]) -> int:
    return load_script("benchmarks/benchmark.py").main(argv)

from modeling_mfm import MFMConfig


def test_training_step_benchmark(tiny_config_factory):
    try:
        result = benchmark_training_step(tiny_config_factory("beit"), batch_size=2, steps=2, warmup_steps=1, cpu=True,
                                         peak_tflops=1.0)
    finally:
        AcceleratorState._reset_state(True)
    assert result["img_per_s"] > 0 and result["peak_memory_mib"] > 0 and result["batch_size"] == 2
    assert result["img_per_s"] == pytest.approx(2 / result["step_seconds"])
    assert result["mfu"] == pytest.approx(result["gflops_per_image"] * 1e9 * result["img_per_s"] / 1e12)
    assert result["parameters_millions"] > 0
    # one warm-up step, timed apart from the median (with torch.compile it holds the compilation)
    assert 0 < result["warmup_seconds"] < 20 * max(result["step_seconds_mean"], 0.05)
    with pytest.raises(ValueError, match="batch_size"):
        benchmark_training_step(tiny_config_factory("beit"), batch_size=0)


def test_training_step_benchmark_with_the_bf16_residual_stream(tiny_config_factory):
    try:
        result = benchmark_training_step(tiny_config_factory("beit"), batch_size=2, steps=1, warmup_steps=0, cpu=True,
                                         mixed_precision="bf16", bf16_residual_stream=True)
    finally:
        AcceleratorState._reset_state(True)
    assert result["bf16_residual_stream"] and result["mixed_precision"] == "bf16" and result["final_loss"] > 0
    with pytest.raises(ValueError, match="needs mixed_precision 'bf16'"):
        benchmark_training_step(tiny_config_factory("beit"), batch_size=2, bf16_residual_stream=True)


@pytest.mark.parametrize("decode_on_device", [False, True])
def test_input_pipeline_benchmark_counts_images(tmp_path, decode_on_device):
    folder = noise_jpegs(tmp_path / "images", 5, (60, 80), seed=0)
    (folder / "bad.jpg").write_bytes(b"nope")
    # 6 files repeated twice in one pass of 12 samples, in batches of 2: the untimed first batch, then 5 timed ones
    # (10 samples), which meet the unreadable file once or twice
    result = benchmark_input_pipeline(str(folder), image_size=16, batch_size=2, num_workers=0, batches=5,
                                      cache_dir=str(tmp_path / "cache"), decode_on_device=decode_on_device,
                                      device="cpu")
    assert result["decode_on_device"] is decode_on_device and result["device"] == "cpu"
    assert result["images"] == 10 and result["img_per_s"] > 0 and result["folder_images"] == 6
    assert 0 < result["in_process_ms_per_image"] < 1000 / result["img_per_s"]
    assert 1 <= result["skipped_images"] <= 2


def test_transform_stages_add_up_to_one_workers_time(tmp_path):
    folder = noise_jpegs(tmp_path / "images", 3, (300, 400), seed=2)
    result = benchmark_transform_stages(str(folder), image_size=64, passes=2, cache_dir=str(tmp_path / "cache"))
    assert result["folder_images"] == 3
    stages = [result[f"{name}_ms"] for name in ("open", "decode", "crop_resize")]
    assert all(value > 0 for value in stages) and result["pil_resize_ms"] > 0
    assert result["total_ms"] == pytest.approx(sum(stages))
    assert result["img_per_s_one_core"] == pytest.approx(1000 / result["total_ms"])
    with pytest.raises(ValueError, match="passes"):
        benchmark_transform_stages(str(folder), passes=0)




def test_batch_size_sweep_reports_memory_per_batch_and_survives_out_of_memory(tmp_path):
    import json

    huge = 375_000_000_000_000  # its uint8 images alone would need about 10^18 bytes
    try:
        code = benchmark_cli(["--presets", "mfm-vit-tiny", "--image_size", "32", "--per_device_train_batch_size", "2",
                                         str(huge), "8", "--steps", "1", "--warmup_steps", "0", "--cpu",
                                         "--json", str(tmp_path / "sweep.json")])
    finally:
        AcceleratorState._reset_state(True)
    assert code == 0
    results = json.loads((tmp_path / "sweep.json").read_text())
    assert [(r["batch_size"], r.get("out_of_memory", False)) for r in results] == [(2, False), (huge, True), (8, False)]
    assert results[0]["peak_memory_mib"] > 0 and results[2]["peak_memory_mib"] > 0


def test_benchmark_script_writes_json(tmp_path):
    import json

    images = noise_jpegs(tmp_path / "images", 4, (50, 50), seed=1)
    try:
        code = benchmark_cli(["--presets", "mfm-vit-tiny", "--image_size", "32", "--per_device_train_batch_size", "2", "--steps", "1",
                              "--warmup_steps", "0", "--cpu", "--data_dir", str(images), "--dataloader_num_workers", "0",
                              "--data_batch_size", "2", "--data_batches", "1", "--cache_dir", str(tmp_path / "cache"),
                              "--decode_on_device", "both", "--plain_baseline", "--pipeline_stages",
                              "--json", str(tmp_path / "r.json")])
    finally:
        AcceleratorState._reset_state(True)
    assert code == 0
    results = json.loads((tmp_path / "r.json").read_text())
    assert [r["benchmark"] for r in results] == ["transform_stages", "input_pipeline", "input_pipeline",
                                                 "training_step"]
    stages, pipelines, step = results[0], results[1:3], results[3]
    assert stages["folder_images"] == 4 and stages["total_ms"] > 0
    assert [r["decode_on_device"] for r in pipelines] == [False, True]
    assert pipelines[0]["images"] == pipelines[1]["images"] == 2
    assert step["model"] == "mfm-vit-tiny" and step["img_per_s"] > 0
    assert step["plain_baseline"]["img_per_s"] > 0 and step["plain_baseline"]["speedup"] > 0


def test_flops_per_image_match_the_transformer_formula():
    """Matmul FLOPs of a ViT training step, counted by hand: every layer that needs input gradients costs 3x its
    forward (forward, grad input, grad weight); the patch embedding (input needs no gradient) costs 2x."""
    hidden, layers, patch, size, mlp = 32, 2, 8, 32, 64
    config = MFMConfig.from_preset("mfm-vit-tiny", image_size=size, backbone_overrides=dict(
        hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2, intermediate_size=mlp, patch_size=patch))
    n = (size // patch) ** 2
    tokens = n + 1
    per_layer = (2 * tokens * hidden * 3 * hidden  # q, k, v
                 + 2 * 2 * tokens * tokens * hidden  # scores and weighted sum
                 + 2 * tokens * hidden * hidden  # output projection
                 + 2 * 2 * tokens * hidden * mlp)  # MLP
    patch_embed = 2 * n * 3 * patch * patch * hidden
    decoder = 2 * n * hidden * patch * patch * 3
    expected = 3 * (layers * per_layer + decoder) + 2 * patch_embed
    assert training_flops_per_image(config, batch_size=2) == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("backbone", ["beit", "convnext"])
def test_fast_path_agrees_with_the_plain_step(tiny_config_factory, backbone):
    """bf16 autocast + SDPA + a compiled graph against float32 eager attention, the same masks: bf16 tolerance."""
    result = fast_path_agreement(tiny_config_factory(backbone), batch_size=4, mixed_precision="bf16",
                                 torch_compile=True, compile_backend="aot_eager", device="cpu")
    assert result["loss_plain"] > 0 and result["grad_norm_relative_difference"] > 0  # bf16 really ran
    assert result["loss_relative_difference"] < 1e-2
    assert result["grad_norm_relative_difference"] < 2e-2 and result["grad_cosine_similarity"] > 0.999
    exact = fast_path_agreement(tiny_config_factory(backbone), batch_size=4, mixed_precision="no", device="cpu")
    assert exact["loss_relative_difference"] < 1e-6 and exact["grad_cosine_similarity"] > 0.99999
    with pytest.raises(ValueError, match="corruption 'mfm'"):
        fast_path_agreement(tiny_config_factory(backbone, corruption="sr", loss_on="all"), device="cpu")


def test_profile_table_and_compile_scope_check(tiny_config_factory, tmp_path):
    path = tmp_path / "profile.txt"
    try:
        result = benchmark_training_step(tiny_config_factory("beit"), batch_size=2, steps=1, warmup_steps=1, cpu=True,
                                         profile_path=str(path))
        with pytest.raises(ValueError, match="compile_scope"):
            benchmark_training_step(tiny_config_factory("beit"), batch_size=2, compile_scope="decoder")
    finally:
        AcceleratorState._reset_state(True)
    table = path.read_text()
    assert result["img_per_s"] > 0 and result["compile_scope"] is None and result["compile_mode"] is None
    assert "peak_reserved_mib" not in result  # an accelerator allocator's figure; the CPU has the RSS peak only
    # three profiled steps: every step's optimizer update and the attention of each block appear
    assert "3 steps" in table and "Optimizer.step" in table and "scaled_dot_product" in table
