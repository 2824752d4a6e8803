"""MFM models: numerics against the official implementation, every backbone, masks, heads, precision."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import TINY_BACKBONES, tiny_config

from modeling_mfm import MFMConfig, MFMForImageClassification, MFMForPreTraining, MFMModel, low_pass_mask

GOLDEN = Path(__file__).resolve().parents[1] / "fixtures" / "tiny_vit_p16.pt"
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


@pytest.mark.parametrize("layer_scale", [0.0, 0.1])
@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_transformer_decoder_blocks_compute_what_the_beit_layers_did(layer_scale, attention):
    """The decoder's own blocks replace transformers' BeitLayer (same parameter names, so saved checkpoints load):
    the same outputs as BeitLayer with the settings the decoder used to give it."""
    from transformers import BeitConfig
    from transformers.models.beit.modeling_beit import BeitLayer

    torch.manual_seed(0)
    backbone = {**TINY_BACKBONES["beit"], "layer_scale_init_value": layer_scale}
    config = tiny_config("beit", backbone_config=backbone, decoder_depth=2, decoder_hidden_size=16,
                         decoder_num_attention_heads=2)
    decoder = MFMForPreTraining(config).decoder.double().eval()
    for parameter in decoder.parameters():  # away from the initial values (zero biases, unit norms)
        parameter.data.normal_(0, 0.2)
    reference_config = BeitConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                                  layer_scale_init_value=layer_scale, use_relative_position_bias=False,
                                  layer_norm_eps=1e-6, patch_size=8, image_size=32)
    reference_config._attn_implementation = attention
    tokens = torch.randn(3, 17, 16, dtype=torch.float64)
    tolerance = 1e-6 if attention == "eager" else 1e-10  # transformers' eager softmax runs in float32
    for layer in decoder.layers:
        reference = BeitLayer(reference_config).double().eval()
        reference.load_state_dict(layer.state_dict(), strict=True)
        expected = reference(tokens, resolution=(32, 32))
        torch.testing.assert_close(layer(tokens), expected, rtol=tolerance, atol=tolerance)


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


def test_other_resolution_with_interpolated_position_embeddings():
    torch.manual_seed(0)
    model = MFMForPreTraining(tiny_config("beit")).eval()
    out = model(torch.randn(1, 3, 48, 64))
    assert out.reconstruction.shape == (1, 3, 48, 64) and out.frequency_mask.shape == (1, 48, 64)
    assert torch.isfinite(out.reconstruction).all() and out.loss > 0
    # the mask follows the input size: a 48x64 low- or high-pass mask around the centre (24, 32)
    low = low_pass_mask(48, 64, model.config.mask_radius)
    assert torch.equal(out.frequency_mask[0], low) or torch.equal(out.frequency_mask[0], 1 - low)
    encoder = MFMModel(tiny_config("beit")).eval()
    pixels = torch.randn(1, 3, 48, 48)
    enc = encoder(pixels, interpolate_pos_encoding=True)
    assert enc.last_hidden_state.shape == (1, 1 + 36, 32)
    # interpolating to the configured size changes nothing; to another size, the position embeddings do change
    native = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(encoder(native, interpolate_pos_encoding=True).last_hidden_state,
                               encoder(native).last_hidden_state)
    with torch.no_grad():
        encoder.backbone.embeddings.position_embeddings.normal_()
    assert not torch.allclose(encoder(pixels, interpolate_pos_encoding=True).last_hidden_state, enc.last_hidden_state)


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


@pytest.mark.parametrize("make_model", [
    lambda: MFMForPreTraining(tiny_config("beit")),
    lambda: MFMForImageClassification(tiny_config("resnet", num_labels=2)),
    lambda: MFMModel(tiny_config("convnext")),
])
def test_misused_inputs_get_a_value_error_that_says_what_is_expected(make_model):

    model = make_model()
    images = torch.randn(2, 3, 32, 32)
    cases = [
        (images.mul(255).clamp(0, 255).to(torch.uint8), "must be floating point"),
        (images.double(), r"is torch.float64 but the model is torch.float32"),
        (images.numpy(), r"must be a torch.Tensor, got ndarray \(torch.from_numpy"),
        (images[:0], "empty batch"),
        (images[0], r"must be \(batch, 3, height, width\)"),
    ]
    for pixel_values, match in cases:
        with pytest.raises(ValueError, match=match):
            model(pixel_values)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # under autocast half inputs are fine, float64 is not
        assert torch.isfinite(next(iter(model(images.bfloat16()).values())).float()).all()
        with pytest.raises(ValueError, match="is torch.float64"):
            model(images.double())


def test_misused_frequency_masks_get_a_value_error_and_an_empty_one_a_zero_loss():
    model = MFMForPreTraining(tiny_config("beit")).eval()
    images = torch.randn(2, 3, 32, 32)
    keep = low_pass_mask(32, 32, 4)
    for mask, match in [
        (keep[0], r"frequency_mask must be \(B, H, W\)"),  # (H,) row
        (keep[None, :, 0].expand(2, 32), r"frequency_mask must be \(B, H, W\)"),  # (B, H)
        (keep * 0.5, "only 0 \\(removed\\) and 1 \\(kept\\)"),
        (keep.numpy(), "must be a torch.Tensor"),
    ]:
        with pytest.raises(ValueError, match=match):
            model(images, frequency_mask=mask)
    # (H, W) is one mask for the whole batch; a mask that removes nothing leaves nothing to score: loss 0, not NaN
    torch.testing.assert_close(model(images, frequency_mask=keep).loss,
                               model(images, frequency_mask=keep.expand(2, 32, 32)).loss)
    nothing_removed = model(images, frequency_mask=torch.ones(2, 32, 32))
    assert nothing_removed.loss.item() == 0.0
    with pytest.raises(ValueError, match="frequency_mask is for corruption 'mfm'"):
        MFMForPreTraining(tiny_config("beit", corruption="sr"))(images, frequency_mask=keep)
    with pytest.raises(ValueError, match="degraded_pixel_values must be floating point"):
        MFMForPreTraining(tiny_config("beit", corruption="sr"))(images, degraded_pixel_values=images.to(torch.uint8))


def test_classification_losses_follow_problem_type():
    config = tiny_config("resnet", num_labels=3)
    model = MFMForImageClassification(config).eval()
    x = torch.randn(4, 3, 32, 32)
    labels = torch.tensor([0, 1, 2, 1])
    out = model(x, labels=labels)
    torch.testing.assert_close(out.loss, torch.nn.functional.cross_entropy(out.logits, labels))
    multi = MFMForImageClassification(tiny_config("resnet", num_labels=3)).eval()
    targets = torch.tensor([[1.0, 0, 1], [0, 0, 1], [1, 1, 1], [0, 0, 0]])
    out = multi(x, labels=targets)
    torch.testing.assert_close(out.loss, torch.nn.functional.binary_cross_entropy_with_logits(out.logits, targets))
    regression = MFMForImageClassification(tiny_config("resnet", num_labels=1)).eval()
    values = torch.randn(4)
    out = regression(x, labels=values)
    torch.testing.assert_close(out.loss, ((out.logits.squeeze(-1) - values) ** 2).mean())
