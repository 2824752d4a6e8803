"""Frozen-feature evaluation: kNN votes, the BatchNorm + Linear probe, feature pooling, and the script end to end."""

from __future__ import annotations

import json
import math

import pytest
import torch
from classification_fixtures import make_class_folders, run_script
from conftest import tiny_config

from modeling_mfm import MFMForPreTraining, MFMModel
from modeling_mfm.training.evaluation.linear_probe import LinearProbe, knn_scores, pool_features, train_linear_probe


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny ops are dominated by thread start-up on a busy 2-core machine; restore the setting afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def brute_force_knn(bank, bank_labels, queries, num_classes, k, temperature):
    """One query at a time, with plain Python: cosine similarities, the k largest, exp(s / T) summed per class."""
    votes = []
    for q in queries:
        sims = [float(torch.dot(q, b) / (q.norm() * b.norm())) for b in bank]
        nearest = sorted(range(len(sims)), key=lambda i: -sims[i])[:k]
        row = [0.0] * num_classes
        for i in nearest:
            row[int(bank_labels[i])] += math.exp(sims[i] / temperature)
        votes.append(row)
    return torch.tensor(votes)


def test_knn_matches_a_brute_force_vote():
    generator = torch.Generator().manual_seed(0)
    bank, queries = torch.randn(30, 6, generator=generator), torch.randn(7, 6, generator=generator)
    labels = torch.randint(0, 4, (30,), generator=generator)
    ours = knn_scores(bank, labels, queries, num_classes=4, k=5, temperature=0.5, chunk_size=3)
    torch.testing.assert_close(ours, brute_force_knn(bank, labels, queries, 4, 5, 0.5), rtol=1e-4, atol=1e-5)


def test_knn_separates_clusters_with_the_default_protocol():
    generator = torch.Generator().manual_seed(1)
    centres = torch.eye(3, 16) * 5
    labels = torch.arange(3).repeat_interleave(25)
    bank = centres[labels] + torch.randn(75, 16, generator=generator)
    queries = centres + 0.5 * torch.randn(3, 16, generator=generator)
    votes = knn_scores(bank, labels, queries, num_classes=3)  # k = 20, T = 0.07
    assert votes.argmax(1).tolist() == [0, 1, 2]


def test_linear_probe_head_and_training():
    probe = LinearProbe(8, 3)
    assert probe.norm.weight is None and probe.norm.bias is None  # BatchNorm without affine parameters
    generator = torch.Generator().manual_seed(2)
    # classes differ along one direction; a large shared offset and scale that the BatchNorm removes
    labels = torch.arange(3).repeat(40)
    features = 100 + 50 * torch.randn(120, 8, generator=generator)
    features[:, 0] = 100 + 30 * labels + torch.randn(120, generator=generator)
    _, scores = train_linear_probe(features[:90], labels[:90], features[90:], labels[90:], 3, epochs=60,
                                   batch_size=30, base_lr=1.0, warmup_epochs=3)
    assert scores["top1"] > 90.0 and scores["top3"] == 100.0


@pytest.mark.parametrize("backbone", ["beit", "convnext"])
def test_pooled_features_are_the_encoders_pooler_output(backbone):
    encoder = MFMModel(tiny_config(backbone)).eval()  # what load_encoder and AutoModel build
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        outputs = encoder(images)
        pooled = pool_features(encoder, images)
    torch.testing.assert_close(pooled, outputs.pooler_output, atol=0, rtol=0)
    hidden = outputs.last_hidden_state
    if backbone == "beit":
        torch.testing.assert_close(pooled, encoder.fc_norm(hidden[:, 1:].mean(1)))
        torch.testing.assert_close(pool_features(encoder, images, "cls"), hidden[:, 0])
    else:
        torch.testing.assert_close(pooled, encoder.backbone.layernorm(hidden.mean((-2, -1))))


def test_run_linear_probe_end_to_end(tmp_path):
    folders = make_class_folders(tmp_path / "data", {"train": 8, "validation": 5})
    torch.manual_seed(0)
    MFMForPreTraining(tiny_config("beit")).save_pretrained(tmp_path / "mfm")
    run_script("run_linear_probe.py", [
        "--model_name_or_path", str(tmp_path / "mfm"), "--train_dir", str(folders / "train"),
        "--validation_dir", str(folders / "validation"), "--output_dir", str(tmp_path / "out"),
        "--dataloader_num_workers", "0", "--per_device_eval_batch_size", "4", "--num_train_epochs", "20",
        "--per_device_train_batch_size", "8", "--cache_dir", str(tmp_path / "cache")], tmp_path)
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert (results["num_train"], results["num_eval"], results["feature_dim"]) == (24, 15, 32)
    assert results["knn"]["k"] == 20 and results["knn"]["temperature"] == 0.07
    # three solid colours: even random features separate them
    assert results["knn"]["top1"] == 100.0
    assert results["linear_probe"]["top1"] >= 80.0
