"""The fast paths are an explicit, reversible step outside the model: the same function, one log line, the caller's
config untouched, hooked / adapted / subclassed layers left alone, and the stock forward with one warning where a
transformers internal is missing. The model itself swaps no class and registers nothing."""

from __future__ import annotations

import logging

import pytest
import torch
import transformers
from conftest import TINY_BACKBONES, tiny_config
from torch import nn
from transformers.models.beit import modeling_beit

from modeling_mfm import MFMForPreTraining, MFMModel, low_pass_mask
from modeling_mfm.fast_paths import apply_fast_paths, layer_scale, qkv_projection, remove_fast_paths
from modeling_mfm.fast_paths.layer_scale import UnitLayerScale
from modeling_mfm.fast_paths.patch_linear import PatchEmbeddingProjection, PointwiseProjection
from modeling_mfm.training.loops.finetune import FinetuneArguments
from modeling_mfm.training.loops.pretraining_arguments import parse_arguments
from modeling_mfm.training.models.model_factory import build_model

MASK = torch.stack([low_pass_mask(32, 32, 4), 1 - low_pass_mask(32, 32, 4)])
X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
DECODER = {"decoder_depth": 1, "decoder_hidden_size": 16, "decoder_num_attention_heads": 2}


def loss(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(X, frequency_mask=MASK).loss


def module_types(model: nn.Module) -> dict[str, type]:
    return {name: type(module) for name, module in model.named_modules()}


def attention_settings(config) -> tuple:
    return config._attn_implementation, config.backbone_config._attn_implementation


@pytest.mark.parametrize("backbone", ["beit", "vit", "resnet"])
def test_apply_logs_what_it_switched_keeps_the_config_and_remove_restores_the_stock_model(backbone, caplog):
    config = tiny_config(backbone, **(DECODER if backbone == "beit" else {}))
    model = MFMForPreTraining(config).eval()
    stock_types, stock_loss = module_types(model), loss(model)
    settings, serialised = attention_settings(config), config.to_dict()
    with caplog.at_level(logging.INFO, logger="modeling_mfm.fast_paths"):
        fast = apply_fast_paths(model)
    lines = [r.getMessage() for r in caplog.records if r.name == "modeling_mfm.fast_paths"]
    assert len(lines) == 1 and lines[0].startswith("fast paths on MFMForPreTraining:"), lines
    expected = {"decoder_gemm"} | ({"patch_gemm", "mask_free_sdpa", "fused_qkv"} if backbone != "resnet" else set())
    expected |= {"unit_layer_scale"} if backbone == "beit" and layer_scale.FLOAT_SUBCLASSES_TRACEABLE else set()
    assert {name for name, count in fast.switched.items() if count} == expected
    assert all(f"{name} x" in lines[0] for name in expected)
    assert attention_settings(config) == settings and config.to_dict() == serialised  # the caller's config
    assert module_types(model) != stock_types
    torch.testing.assert_close(loss(model), stock_loss, atol=1e-6, rtol=1e-5)
    assert apply_fast_paths(model) is fast  # applying twice changes nothing more
    assert remove_fast_paths(model) and not remove_fast_paths(model)
    assert module_types(model) == stock_types and attention_settings(config) == settings
    assert model.mfm.backbone.config is config.backbone_config or backbone == "resnet"
    torch.testing.assert_close(loss(model), stock_loss, atol=0, rtol=0)


def test_the_bf16_residual_stream_is_a_fast_path_the_handle_undoes_and_a_cnn_is_refused_first():
    model = MFMForPreTraining(tiny_config("beit")).eval()
    embeddings = model.mfm.backbone.embeddings
    fast = apply_fast_paths(model, bf16_residual_stream=True)
    assert fast.switched["bf16_residual_stream"] == 1 and len(embeddings._forward_hooks) == 1
    assert "bf16_residual_stream x1" in fast.summary()
    fast.remove()
    assert not embeddings._forward_hooks and not remove_fast_paths(model)
    resnet = MFMForPreTraining(tiny_config("resnet")).eval()
    stock_types = module_types(resnet)
    with pytest.raises(ValueError, match="for ViT encoders"):
        apply_fast_paths(resnet, bf16_residual_stream=True)
    assert module_types(resnet) == stock_types and not remove_fast_paths(resnet)  # nothing was switched


def test_building_a_model_swaps_no_class_and_registers_nothing():
    config = tiny_config("beit", **DECODER)
    model = MFMForPreTraining(config)
    for name, module in model.named_modules():
        assert not type(module).__module__.startswith("modeling_mfm.fast_paths"), name
    assert not any(isinstance(getattr(m, "lambda_1", None), UnitLayerScale) for m in model.modules())
    assert attention_settings(config) in (("sdpa", "sdpa"), (None, None), (None, "sdpa"))
    assert model.mfm.backbone.config is config.backbone_config  # no private copy in the pre-training encoder


def test_hooked_and_subclassed_layers_keep_their_own_forward():
    model = MFMForPreTraining(tiny_config("beit")).eval()
    calls = []
    model.mfm.backbone.embeddings.patch_embeddings.projection.register_forward_hook(lambda *_: calls.append("patch"))
    model.decoder.projection.register_forward_pre_hook(lambda *_: calls.append("decoder"))
    attention = model.mfm.backbone.layers[0].attention

    class CustomAttention(type(attention)):  # a subclass someone put in on purpose
        pass

    attention.__class__ = CustomAttention
    fast = apply_fast_paths(model)
    assert fast.switched["patch_gemm"] == 0 and fast.switched["decoder_gemm"] == 0
    assert type(model.mfm.backbone.embeddings.patch_embeddings.projection) is nn.Conv2d
    assert type(model.decoder.projection) is nn.Conv2d
    assert type(attention) is CustomAttention and fast.switched["fused_qkv"] == 1  # only the other layer's
    loss(model)
    assert calls == ["patch", "decoder"]


def test_a_hook_on_the_decoder_projection_takes_effect():
    """The decoder calls its projection module: a hook (or an adapter, see test_common) changes the output."""
    model = MFMForPreTraining(tiny_config("resnet")).eval()
    with torch.no_grad():
        before = model(X, frequency_mask=MASK).reconstruction
        model.decoder.projection.register_forward_hook(lambda module, args, output: output * 2)
        after = model(X, frequency_mask=MASK).reconstruction
    torch.testing.assert_close(after, 2 * before)


def test_missing_transformers_internals_leave_the_stock_forward_with_one_warning(monkeypatch, caplog):
    model = MFMForPreTraining(tiny_config("beit")).eval()
    stock_types, stock_loss = module_types(model), loss(model)
    monkeypatch.delattr(modeling_beit, "eager_attention_forward")  # functions renamed in some release
    monkeypatch.delattr(transformers.masking_utils, "sdpa_mask")
    with caplog.at_level(logging.WARNING, logger="modeling_mfm.fast_paths"):
        fast = apply_fast_paths(model)
    monkeypatch.undo()  # (transformers' own forward needs them here; a release without them would not)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "fused_qkv" in warnings[0].getMessage() and "mask_free_sdpa" in warnings[0].getMessage()
    assert set(fast.unavailable) == {"fused_qkv", "mask_free_sdpa"}
    assert fast.switched["patch_gemm"] == 1  # the paths that need no missing internal still apply
    assert not any("FusedQKV" in type(m).__name__ for m in model.modules())
    torch.testing.assert_close(loss(model), stock_loss, atol=1e-6, rtol=1e-5)
    fast.remove()
    assert module_types(model) == stock_types


def test_a_renamed_attribute_leaves_the_stock_attention(monkeypatch, caplog):
    monkeypatch.setattr(qkv_projection, "_ATTRIBUTES", (*qkv_projection._ATTRIBUTES, "query"))  # as if renamed
    model = MFMForPreTraining(tiny_config("vit")).eval()
    stock_loss = loss(model)
    with caplog.at_level(logging.WARNING, logger="modeling_mfm.fast_paths"):
        fast = apply_fast_paths(model)
    assert list(fast.unavailable) == ["fused_qkv"] and "query" in fast.unavailable["fused_qkv"]
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1
    torch.testing.assert_close(loss(model), stock_loss, atol=1e-6, rtol=1e-5)


def _multiplies(step) -> int:
    from torch.profiler import profile

    with profile() as profiler:
        step()
    return sum(event.count for event in profiler.key_averages() if event.key == "aten::mul")


@pytest.mark.skipif(not layer_scale.FLOAT_SUBCLASSES_TRACEABLE, reason="this torch keeps the plain 1.0")
def test_switched_off_layer_scale_costs_no_multiply_and_changes_nothing():
    config = tiny_config("beit")
    images = torch.randn(2, 3, 32, 32)
    model = MFMModel(config, add_pooling_layer=False).train()
    stock_output = model(images).last_hidden_state
    layers = config.backbone_config.num_hidden_layers
    stock_muls = _multiplies(lambda: model(images).last_hidden_state.sum().backward())
    saved = {n for n, _ in model.named_parameters()}
    apply_fast_paths(model, patch_gemm=False, fused_qkv=False, mask_free_sdpa=False)
    assert repr(model.backbone.layers[0].lambda_1) == "1.0 (no layer scale)"
    torch.testing.assert_close(model(images).last_hidden_state, stock_output, atol=0, rtol=0)
    # transformers multiplies both branches of every block by 1.0, forward and backward; with the fast path it does not
    assert stock_muls - _multiplies(lambda: model(images).last_hidden_state.sum().backward()) >= 2 * layers
    assert saved == {n for n, _ in model.named_parameters()}  # no parameter added or lost
    # a real layer scale stays a trained parameter
    scaled = MFMForPreTraining(tiny_config("beit", backbone_config={**TINY_BACKBONES["beit"],
                                                                    "layer_scale_init_value": 0.1}))
    apply_fast_paths(scaled)
    lambdas = [p for n, p in scaled.named_parameters() if n.endswith(("lambda_1", "lambda_2"))]
    assert len(lambdas) == 2 * layers
    scaled(images).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in lambdas)


def test_torch_that_cannot_trace_the_unit_layer_scale_keeps_the_plain_float(monkeypatch):
    """torch.compile before 2.14 breaks the graph at each multiply by the float subclass: such a torch keeps
    transformers' plain 1.0, and the compiled forward stays one graph."""
    monkeypatch.setattr(layer_scale, "FLOAT_SUBCLASSES_TRACEABLE", False)
    model = MFMForPreTraining(tiny_config("beit")).train()
    apply_fast_paths(model)
    scales = [getattr(layer, name) for layer in model.modules() if hasattr(layer, "lambda_1")
              for name in ("lambda_1", "lambda_2")]
    assert scales and all(type(scale) is float and scale == 1.0 for scale in scales)
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(model)(torch.randn(2, 3, 32, 32))
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1


def test_the_scripts_apply_the_fast_paths_unless_told_not_to():
    config = tiny_config("beit")
    assert isinstance(build_model(config).decoder.projection, PointwiseProjection)
    stock = build_model(config, fast_paths=False)
    assert type(stock.decoder.projection) is nn.Conv2d
    assert parse_arguments([])[0].fast_paths and not parse_arguments(["--no_fast_paths"])[0].fast_paths
    from transformers import HfArgumentParser

    (finetune,) = HfArgumentParser(FinetuneArguments).parse_args_into_dataclasses(
        ["--preset", "mfm-vit-tiny", "--train_dir", "x", "--no_fast_paths"])
    assert finetune.fast_paths is False
    assert not any(isinstance(m, PatchEmbeddingProjection) for m in stock.modules())
