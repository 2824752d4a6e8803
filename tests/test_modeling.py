"""MFM models: numerics against the official implementation, every backbone, masks, heads, precision."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import TINY_BACKBONES, tiny_config

from modeling_mfm import MFMConfig, MFMForImageClassification, MFMForPreTraining, MFMModel, low_pass_mask
from modeling_mfm import modeling_mfm as modeling_module
from modeling_mfm.training.model_factory import enable_activation_checkpointing

GOLDEN = Path(__file__).parent / "fixtures" / "tiny_vit_p16.pt"
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def official_to_ours(sd: dict[str, torch.Tensor], depth: int) -> dict[str, torch.Tensor]:
    """Official BEiT-style names -> transformers BEiT names (fused qkv rows are [q; k; v], no k bias)."""
    p = "mfm.backbone."
    out = {
        p + "embeddings.cls_token": sd["encoder.cls_token"],
        p + "embeddings.position_embeddings": sd["encoder.pos_embed"],
        p + "embeddings.patch_embeddings.projection.weight": sd["encoder.patch_embed.proj.weight"],
        p + "embeddings.patch_embeddings.projection.bias": sd["encoder.patch_embed.proj.bias"],
        p + "layernorm.weight": sd["encoder.norm.weight"],
        p + "layernorm.bias": sd["encoder.norm.bias"],
        "decoder.projection.weight": sd["decoder.0.weight"],
        "decoder.projection.bias": sd["decoder.0.bias"],
    }
    for i in range(depth):
        o, n = f"encoder.blocks.{i}.", f"{p}layers.{i}."
        q, k, v = sd[o + "attn.qkv.weight"].chunk(3)
        out.update({
            n + "attention.q_proj.weight": q, n + "attention.q_proj.bias": sd[o + "attn.q_bias"],
            n + "attention.k_proj.weight": k,
            n + "attention.v_proj.weight": v, n + "attention.v_proj.bias": sd[o + "attn.v_bias"],
            n + "attention.o_proj.weight": sd[o + "attn.proj.weight"],
            n + "attention.o_proj.bias": sd[o + "attn.proj.bias"],
        })
        for official, ours in [("norm1", "layernorm_before"), ("norm2", "layernorm_after"), ("mlp.fc1", "mlp.fc1"),
                               ("mlp.fc2", "mlp.fc2")]:
            out[n + ours + ".weight"] = sd[o + official + ".weight"]
            out[n + ours + ".bias"] = sd[o + official + ".bias"]
    return out


@pytest.fixture(scope="module")
def golden():
    return torch.load(GOLDEN, weights_only=True)


def golden_model(golden, attn_implementation: str = "eager") -> MFMForPreTraining:
    s = golden["settings"]
    config = MFMConfig.from_preset(
        "mfm-vit-base", image_size=s["image_size"], mask_radius=s["mask_radius_inner"],
        low_pass_probability=s["low_pass_probability"], loss_on=s["loss_on"],
        backbone_overrides=dict(hidden_size=s["hidden_size"], num_hidden_layers=s["num_layers"],
                                num_attention_heads=s["num_heads"], intermediate_size=s["mlp_ratio"] * s["hidden_size"],
                                patch_size=s["patch_size"], layer_norm_eps=s["layer_norm_eps"]),
    )
    model = MFMForPreTraining(config)
    model.load_state_dict(official_to_ours(golden["state_dict"], s["num_layers"]), strict=True)
    model.mfm.backbone.config._attn_implementation = attn_implementation
    return model


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_reproduces_the_official_model(golden, attn):
    model = golden_model(golden, attn)
    pixel_values = (golden["img"] - MEAN) / STD
    for mode in ("train", "eval"):
        getattr(model, mode)()
        out = model(pixel_values, frequency_mask=golden["mask"], output_hidden_states=True)
        torch.testing.assert_close(out.corrupted_pixel_values, golden["encoder_input"], atol=1e-5, rtol=1e-4)
        features = out.hidden_states[-1]  # before the final LayerNorm
        features = model.mfm.backbone.layernorm(features)[:, 1:].transpose(1, 2).reshape(4, 64, 2, 2)
        torch.testing.assert_close(features, golden["features"], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(out.reconstruction, golden["recon"], atol=1e-5, rtol=1e-4)
        expected = golden["loss"] if mode == "train" else golden["loss_eval"]
        assert abs(out.loss.item() - expected.item()) <= 1e-5 * abs(expected.item())
    model.train()
    model(pixel_values, frequency_mask=golden["mask"]).loss.backward()
    grad_norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()]))
    assert grad_norm.item() == pytest.approx(golden["grad_total_norm"].item(), rel=1e-4)


def test_golden_masks_are_the_official_pattern(golden):
    keep = low_pass_mask(32, 32, golden["settings"]["mask_radius_inner"]).long()
    for i, mask in enumerate(golden["mask"]):
        assert torch.equal(mask, keep if i % 2 == 0 else 1 - keep)


@pytest.mark.parametrize("backbone", list(TINY_BACKBONES))
def test_every_backbone_trains(backbone):
    torch.manual_seed(0)
    model = MFMForPreTraining(tiny_config(backbone)).train()
    pixel_values = torch.randn(2, 3, 32, 32)
    out = model(pixel_values)
    assert out.reconstruction.shape == pixel_values.shape == out.corrupted_pixel_values.shape
    assert out.frequency_mask.shape == (2, 32, 32) and torch.isfinite(out.loss)
    out.loss.backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert no_grad == []
    zero = [n for n, p in model.named_parameters() if p.grad.abs().sum() == 0]
    assert zero == []


@pytest.mark.parametrize("backbone", list(TINY_BACKBONES))
def test_classifier_and_encoder_outputs(backbone):
    config = tiny_config(backbone, num_labels=5)
    model = MFMForImageClassification(config).train()
    labels = torch.tensor([1, 4])
    out = model(torch.randn(2, 3, 32, 32), labels=labels)
    assert out.logits.shape == (2, 5) and torch.isfinite(out.loss)
    out.loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    encoder = MFMModel(config).eval()
    enc = encoder(torch.randn(2, 3, 32, 32), output_hidden_states=True)
    assert enc.pooler_output.shape == (2, config.encoder_hidden_size)
    assert len(enc.hidden_states) >= 2
    if config.is_vit:
        assert enc.last_hidden_state.shape == (2, 1 + 16, 32)
        expected = encoder.fc_norm(enc.last_hidden_state[:, 1:].mean(1))
    else:
        assert enc.last_hidden_state.shape[-2:] == (1, 1)
        pooled = enc.last_hidden_state.mean((-2, -1))
        expected = encoder.backbone.layernorm(pooled) if hasattr(encoder.backbone, "layernorm") else pooled
    torch.testing.assert_close(enc.pooler_output, expected)


def test_given_mask_gives_the_same_output_and_random_masks_follow_the_seed():
    model = MFMForPreTraining(tiny_config("beit")).eval()
    x = torch.randn(4, 3, 32, 32)
    mask = torch.stack([low_pass_mask(32, 32, 4)] * 2 + [1 - low_pass_mask(32, 32, 4)] * 2)
    a, b = model(x, frequency_mask=mask), model(x, frequency_mask=mask[:, None])
    torch.testing.assert_close(a.loss, b.loss)
    torch.testing.assert_close(a.reconstruction, b.reconstruction)
    torch.manual_seed(3)
    c = model(x)
    torch.manual_seed(3)
    d = model(x)
    assert torch.equal(c.frequency_mask, d.frequency_mask) and torch.equal(c.loss, d.loss)
    # the drawn masks are the configured low-pass or high-pass masks
    keep = low_pass_mask(32, 32, 4)
    for m in c.frequency_mask:
        assert torch.equal(m, keep) or torch.equal(m, 1 - keep)


def test_low_pass_probability_is_respected():
    model = MFMForPreTraining(tiny_config("beit", low_pass_probability=0.3))
    torch.manual_seed(0)
    masks = model.sample_frequency_mask(4000, 32, 32, torch.device("cpu"))
    low_fraction = (masks[:, 16, 16] == 1).float().mean().item()  # the centre is kept only by low-pass masks
    assert abs(low_fraction - 0.3) < 0.03


def test_masked_loss_ignores_kept_frequencies():
    """Changing the reconstruction only on kept frequencies leaves the masked loss unchanged."""
    model = MFMForPreTraining(tiny_config("beit")).eval()
    x = torch.randn(2, 3, 32, 32)
    keep = low_pass_mask(32, 32, 4).expand(2, 32, 32)
    recon = torch.randn(2, 3, 32, 32)
    low_only = torch.fft.ifft2(torch.fft.ifftshift(
        torch.fft.fftshift(torch.fft.fft2(torch.randn(2, 3, 32, 32)), dim=(-2, -1)) * keep[:, None],
        dim=(-2, -1))).real
    a = model.compute_loss(recon, x, keep)
    b = model.compute_loss(recon + low_only, x, keep)
    assert abs(a.item() - b.item()) < 1e-5
    assert abs(model.compute_loss(recon, x, 1 - keep).item() - model.compute_loss(recon + low_only, x, 1 - keep)
               .item()) > 1e-3


def test_transformer_decoder_variant():
    config = tiny_config("beit", decoder_depth=2, decoder_hidden_size=16, decoder_num_attention_heads=2)
    model = MFMForPreTraining(config)
    out = model(torch.randn(2, 3, 32, 32))
    out.loss.backward()
    names = {n for n, _ in model.named_parameters()}
    assert {"decoder.embed.weight", "decoder.position_embeddings", "decoder.layers.1.attention.q_proj.weight",
            "decoder.layernorm.weight", "decoder.projection.weight"} <= names
    assert out.reconstruction.shape == (2, 3, 32, 32)
    assert all(p.grad is not None for p in model.parameters())


def _multiplies(step) -> int:
    from torch.profiler import profile

    with profile() as profiler:
        step()
    return sum(event.count for event in profiler.key_averages() if event.key == "aten::mul")


@pytest.mark.skipif(not modeling_module._FLOAT_SUBCLASSES_TRACEABLE, reason="this torch keeps the plain 1.0")
def test_switched_off_layer_scale_costs_no_multiply_and_changes_nothing():
    from transformers import AutoModel

    config = tiny_config("beit", decoder_depth=1, decoder_hidden_size=16, decoder_num_attention_heads=2)
    images = torch.randn(2, 3, 32, 32)
    stock = AutoModel.from_config(config.backbone_config, add_pooling_layer=False).train()
    model = MFMModel(config, add_pooling_layer=False).train()
    model.backbone.load_state_dict(stock.state_dict())
    torch.testing.assert_close(model(images).last_hidden_state, stock(images).last_hidden_state)
    saved = {n: p.detach().clone() for n, p in model.named_parameters()}
    layers = config.backbone_config.num_hidden_layers
    # transformers multiplies both branches of every block by 1.0, forward and backward; the MFM encoder does not
    stock_muls = _multiplies(lambda: stock(images).last_hidden_state.sum().backward())
    ours_muls = _multiplies(lambda: model(images).last_hidden_state.sum().backward())
    assert stock_muls - ours_muls >= 2 * layers
    assert set(saved) == {n for n, _ in model.named_parameters()}  # no parameter added or lost
    pretraining = MFMForPreTraining(config)
    assert "1.0 (no layer scale)" == repr(pretraining.decoder.layers[0].lambda_1)
    # a real layer scale stays a trained parameter
    scaled = MFMForPreTraining(tiny_config("beit", backbone_config={**TINY_BACKBONES["beit"], "layer_scale_init_value": 0.1}))
    lambdas = [p for n, p in scaled.named_parameters() if n.endswith(("lambda_1", "lambda_2"))]
    assert len(lambdas) == 2 * layers
    scaled(images).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in lambdas)


def test_torch_that_cannot_trace_the_unit_layer_scale_keeps_the_plain_float(monkeypatch):
    """torch.compile before 2.14 breaks the graph at each multiply by the float subclass: such a torch keeps
    transformers' plain 1.0, and the compiled forward stays one graph."""
    monkeypatch.setattr(modeling_module, "_FLOAT_SUBCLASSES_TRACEABLE", False)
    model = MFMForPreTraining(tiny_config("beit")).train()
    scales = [getattr(layer, name) for layer in model.modules() if hasattr(layer, "lambda_1")
              for name in ("lambda_1", "lambda_2")]
    assert scales and all(type(scale) is float and scale == 1.0 for scale in scales)
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(model)(torch.randn(2, 3, 32, 32))
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1


@pytest.mark.parametrize("backbone", ["beit", "vit", "resnet", "convnext"])
def test_gradient_checkpointing_gives_the_same_gradients(backbone):
    model = MFMForPreTraining(tiny_config(backbone)).train()
    x, mask = torch.randn(2, 3, 32, 32), torch.stack([low_pass_mask(32, 32, 4), 1 - low_pass_mask(32, 32, 4)])
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model(x, frequency_mask=mask).loss.backward()
    reference = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.load_state_dict(state)  # BatchNorm running stats back to the same start
    enable_activation_checkpointing(model)
    assert model.mfm.gradient_checkpointing  # CNN stages are checkpointed by MFMModel itself
    model(x, frequency_mask=mask).loss.backward()
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, reference[name], atol=1e-6, rtol=1e-5, msg=name)


def test_other_resolution_with_interpolated_position_embeddings():
    model = MFMForPreTraining(tiny_config("beit")).eval()
    out = model(torch.randn(1, 3, 48, 64))
    assert out.reconstruction.shape == (1, 3, 48, 64) and out.frequency_mask.shape == (1, 48, 64)
    enc = MFMModel(tiny_config("beit"))(torch.randn(1, 3, 48, 48), interpolate_pos_encoding=True)
    assert enc.last_hidden_state.shape == (1, 1 + 36, 32)


def test_attentions_with_eager_attention():
    config = tiny_config("beit")
    config._attn_implementation = "eager"
    out = MFMForPreTraining(config)(torch.randn(2, 3, 32, 32), output_attentions=True)
    assert len(out.attentions) == 2 and out.attentions[0].shape == (2, 2, 17, 17)
    torch.testing.assert_close(out.attentions[0].sum(-1), torch.ones(2, 2, 17))


@pytest.mark.parametrize("backbone", ["beit", "resnet"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_is_finite_and_close(backbone, dtype):
    torch.manual_seed(0)
    model = MFMForPreTraining(tiny_config(backbone)).train()
    x = torch.randn(2, 3, 32, 32)
    mask = torch.stack([low_pass_mask(32, 32, 4), 1 - low_pass_mask(32, 32, 4)])
    reference = model(x, frequency_mask=mask).loss
    with torch.autocast("cpu", dtype=dtype):
        out = model(x, frequency_mask=mask)
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
    assert torch.isfinite(out.reconstruction.float()).all()
    assert abs(out.loss.item() - reference.item()) < 0.05 * reference.item()
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_bad_inputs_get_clear_errors():
    model = MFMForPreTraining(tiny_config("beit"))
    with pytest.raises(ValueError, match=r"pixel_values must be \(batch, 3, height, width\)"):
        model(torch.randn(2, 1, 32, 32))
    with pytest.raises(ValueError, match="divisible by the encoder stride"):
        model(torch.randn(2, 3, 30, 32))
    with pytest.raises(ValueError, match="frequency_mask must be"):
        model(torch.randn(2, 3, 32, 32), frequency_mask=torch.ones(3, 32, 32))
    with pytest.raises(ValueError, match="degraded_pixel_values is for"):
        model(torch.randn(2, 3, 32, 32), degraded_pixel_values=torch.randn(2, 3, 32, 32))
    with pytest.raises(ValueError, match="is a preset"):
        MFMForPreTraining.from_pretrained("mfm-vit-base")


def test_classification_losses_follow_problem_type():
    config = tiny_config("resnet", num_labels=3, label_smoothing=0.1)
    model = MFMForImageClassification(config).eval()
    x = torch.randn(4, 3, 32, 32)
    labels = torch.tensor([0, 1, 2, 1])
    out = model(x, labels=labels)
    log_probs = out.logits.log_softmax(-1)
    expected = -(0.9 * log_probs.gather(1, labels[:, None]).squeeze(1) + 0.1 * log_probs.mean(-1)).mean()
    torch.testing.assert_close(out.loss, expected)
    multi = MFMForImageClassification(tiny_config("resnet", num_labels=3)).eval()
    targets = torch.tensor([[1.0, 0, 1], [0, 0, 1], [1, 1, 1], [0, 0, 0]])
    out = multi(x, labels=targets)
    torch.testing.assert_close(out.loss, torch.nn.functional.binary_cross_entropy_with_logits(out.logits, targets))
    regression = MFMForImageClassification(tiny_config("resnet", num_labels=1)).eval()
    values = torch.randn(4)
    out = regression(x, labels=values)
    torch.testing.assert_close(out.loss, ((out.logits.squeeze(-1) - values) ** 2).mean())
