"""The representation monitor of pre-training: PSNR, the reconstruction gain against an independent numpy
computation of its definition, kNN top-1, the measurement itself, and run_pretrain.py's --monitor_steps end to end
(logged values, the model card, a refused run without a held-out slice)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from classification_fixtures import make_class_folders, run_script, script_env
from conftest import tiny_config

from modeling_mfm import MFMForPreTraining
from modeling_mfm.training.evaluation.representation_monitor import (
    MonitorImages,
    RepresentationMonitor,
    encoder_features,
    knn_top1,
    psnr,
    reconstruction_gain,
    summarize_measurements,
)


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def uint8_images(count: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    """Smooth random images (a colour ramp plus noise): real spectra with energy in both bands."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 1, size)[None, :, None] * rng.uniform(0, 200, (count, 1, 1, 3))[:, 0][:, None]
    pixels = 30 + ramp + rng.normal(0, 20, (count, size, size, 3))
    return torch.from_numpy(np.clip(pixels, 0, 255).astype(np.uint8)).permute(0, 3, 1, 2).contiguous()


def test_psnr_is_ten_log10_of_one_over_the_mean_squared_error():
    reference = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    noisy = (reference + 0.05 * torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(1))).clamp(0, 1)
    expected = [10 * np.log10(1 / np.mean((a - b) ** 2)) for a, b in zip(noisy.numpy(), reference.numpy())]
    assert psnr(noisy, reference).numpy() == pytest.approx(expected, rel=1e-5)
    assert float(psnr(reference, reference)[0]) == pytest.approx(100.0)  # an exact copy: capped, not inf


def numpy_gain(model: MFMForPreTraining, images: torch.Tensor, radius: float) -> dict[str, float]:
    """The gain's definition with numpy's complex FFTs, on the model's own reconstructions: PSNR of
    ifft(keep * F(x) + (1 - keep) * F(clamp(prediction))) (clamped) minus PSNR of the filtered, clamped input."""
    size = images.shape[-1]
    ys, xs = np.mgrid[0:size, 0:size] - size // 2
    low = ((ys**2 + xs**2) < radius**2).astype(np.float64)  # kept below the radius (no outer radius)
    original = images.double().numpy() / 255.0
    gains = {}
    for view, keep in (("low_pass", low), ("high_pass", 1 - low)):
        with torch.no_grad():
            mask = torch.tensor(keep, dtype=torch.float32).expand(len(images), size, size)
            output = model(model.normalize(images.float() / 255.0), frequency_mask=mask)
        std = np.array(model.config.image_std)[None, :, None, None]
        mean = np.array(model.config.image_mean)[None, :, None, None]
        predicted = np.clip(output.reconstruction.double().numpy() * std + mean, 0, 1)

        def spectrum(x):
            return np.fft.fftshift(np.fft.fft2(x), axes=(-2, -1))

        def image(f):
            return np.clip(np.fft.ifft2(np.fft.ifftshift(f, axes=(-2, -1))).real, 0, 1)

        completed = image(keep * spectrum(original) + (1 - keep) * spectrum(predicted))
        corrupted = image(keep * spectrum(original))

        def db(x):
            return 10 * np.log10(1 / ((x - original) ** 2).reshape(len(x), -1).mean(1))

        gains[view] = float(np.mean(db(completed) - db(corrupted)))
    return gains


def test_reconstruction_gain_follows_its_definition():
    torch.manual_seed(0)
    model = MFMForPreTraining(tiny_config("beit", mask_radius=6)).eval()
    images = uint8_images(6)
    gains = reconstruction_gain(model, images, batch_size=4)  # two chunks: the mean is over images
    expected = numpy_gain(model, images, radius=6)
    for view in ("low_pass", "high_pass"):
        assert float(gains[view]) == pytest.approx(expected[view], abs=2e-3)
    # the high-pass view removes the mean colour, which even an untrained decoder's output brings back in part
    assert expected["high_pass"] > 1.0


def test_knn_top1_of_separated_clusters_and_of_mislabelled_ones():
    generator = torch.Generator().manual_seed(0)
    centres = torch.randn(3, 16, generator=generator) * 5
    bank_labels = torch.arange(3).repeat_interleave(10)
    bank = centres[bank_labels] + 0.1 * torch.randn(30, 16, generator=generator)
    query_labels = torch.tensor([0, 1, 2, 2])
    queries = centres[query_labels] + 0.1 * torch.randn(4, 16, generator=generator)
    assert float(knn_top1(bank, bank_labels, queries, query_labels, 3, k=5)) == pytest.approx(100.0)
    assert float(knn_top1(bank, bank_labels, queries, (query_labels + 1) % 3, 3, k=5)) == pytest.approx(0.0)
    assert float(knn_top1(bank, bank_labels, queries, torch.tensor([0, 1, 2, 0]), 3, k=5)) == pytest.approx(75.0)


def test_encoder_features_are_the_normalised_mean_patch_token():
    torch.manual_seed(0)
    model = MFMForPreTraining(tiny_config("beit")).eval()
    images = uint8_images(5)
    features = encoder_features(model, images, batch_size=2)
    with torch.no_grad():
        hidden = model.mfm(model.normalize(images.float() / 255)).last_hidden_state
    mean = hidden[:, 1:].mean(1)
    expected = (mean - mean.mean(1, keepdim=True)) / (mean.var(1, unbiased=False, keepdim=True) + 1e-5).sqrt()
    torch.testing.assert_close(features, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backbone", ["beit", "resnet"])
def test_a_measurement_keeps_the_training_mode_and_gives_every_value(backbone):
    torch.manual_seed(0)
    model = MFMForPreTraining(tiny_config(backbone)).train()
    images = uint8_images(12)
    labels = torch.arange(12) % 3
    monitor = RepresentationMonitor(MonitorImages(images[:8], labels[:8], images[8:], labels[8:], 3), k=3,
                                    gain_size=2)
    values = monitor.measure(model)
    assert model.training
    assert set(values) == {"knn_top1", "gain_low_pass_db", "gain_high_pass_db"}
    assert values["knn_top1"] in (0.0, 25.0, 50.0, 75.0, 100.0)
    assert all(isinstance(value, float) and np.isfinite(value) for value in values.values())
    assert monitor.measure(model) == values  # the same images and no randomness: the same numbers


def test_summary_gives_the_first_and_the_last_measurement():
    records = [{"step": 0, "eval/knn_top1": 20.0, "eval/gain_low_pass_db": -0.5, "eval/gain_high_pass_db": 7.0},
               {"step": 10, "train/loss": 0.3},
               {"step": 20, "eval/knn_top1": 31.5, "eval/gain_low_pass_db": 0.25, "eval/gain_high_pass_db": 9.5}]
    summary = summarize_measurements(records)
    assert list(summary.values()) == [
        "31.50 % at step 20 (step 0: 20.00 %)",
        "+0.25 / +9.50 dB PSNR over the corrupted input (step 0: -0.50 / +7.00 dB)",
    ]
    assert summarize_measurements([{"step": 1, "train/loss": 0.2}]) == {}


@pytest.mark.slow
def test_run_pretrain_monitors_the_held_out_slice_and_writes_the_card(tmp_path):
    folders = make_class_folders(tmp_path / "data", {"train": 10})
    common = ["--preset", "mfm-vit-tiny", "--image_size", "32", "--mask_radius", "4", "--backbone_overrides",
              json.dumps({"patch_size": 8, "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                          "intermediate_size": 64}),
              "--train_dir", str(folders / "train"), "--per_device_train_batch_size", "8", "--report_to", "none",
              "--visualization_steps", "0", "--dataloader_num_workers", "0", "--cache_dir", str(tmp_path / "cache")]
    run_script("run_pretrain.py", [*common, "--output_dir", str(tmp_path / "run"), "--max_train_steps", "5",
                                   "--validation_split_size", "6", "--monitor_steps", "2", "--monitor_bank_size",
                                   "12", "--knn_k", "3"], tmp_path)
    records = [json.loads(line) for line in (tmp_path / "run" / "logs" / "metrics.jsonl").read_text().splitlines()]
    measured = [r for r in records if "eval/knn_top1" in r]
    assert [r["step"] for r in measured] == [0, 2, 4, 5]  # at the start, every 2 steps and at the end
    # 6 held-out images of 3 solid colours: multiples of 100 / 6, and the colours are easy neighbours
    assert all(round(r["eval/knn_top1"] * 6 / 100, 6).is_integer() for r in measured)
    assert measured[-1]["eval/knn_top1"] > 50
    card = (tmp_path / "run" / "README.md").read_text()
    assert f"| kNN top-1 on the held-out slice (monitor) | {measured[-1]['eval/knn_top1']:.2f} % at step 5" in card
    last = measured[-1]
    assert f"{last['eval/gain_low_pass_db']:+.2f} / {last['eval/gain_high_pass_db']:+.2f} dB" in card

    import subprocess
    import sys

    from classification_fixtures import REPO

    refused = subprocess.run(
        [sys.executable, str(REPO / "run_scripts" / "run_pretrain.py"), *common, "--output_dir",
         str(tmp_path / "refused"), "--max_train_steps", "2", "--monitor_steps", "1"],
        cwd=REPO, env=script_env(tmp_path), capture_output=True, text=True, timeout=300, check=False,
    )
    assert refused.returncode == 2, refused.stderr[-2000:]
    assert refused.stderr.strip().splitlines()[-1].startswith("run_pretrain.py: error: --monitor_steps measures on")


def test_the_gain_script_measures_a_saved_model_on_a_folder(tmp_path):
    from conftest import load_script, noise_jpegs

    from modeling_mfm.training.data.device_dataset import load_device_images
    from modeling_mfm.training.data.sources import load_image_dataset

    torch.manual_seed(0)
    MFMForPreTraining(tiny_config("beit")).save_pretrained(tmp_path / "model")
    folder = noise_jpegs(tmp_path / "images", 5, (40, 36), seed=0)
    script = load_script("benchmarks/reconstruction_gain.py")
    assert script.main(["--model_name_or_path", str(tmp_path / "model"), "--image_dir", str(folder),
                        "--output_dir", str(tmp_path / "out"), "--shown", "2"]) == 0
    record = json.loads((tmp_path / "out" / "gain.json").read_text())
    rows, column, _ = load_image_dataset(train_dir=str(folder))
    images = load_device_images(rows, column, 32, "cpu").images
    expected = reconstruction_gain(MFMForPreTraining.from_pretrained(tmp_path / "model").eval(), images)
    assert record["images"] == 5
    assert record["gain_low_pass_db"] == pytest.approx(float(expected["low_pass"]), abs=1e-3)
    assert record["gain_high_pass_db"] == pytest.approx(float(expected["high_pass"]), abs=1e-3)
    assert (tmp_path / "out" / "reconstruction.png").stat().st_size > 0
