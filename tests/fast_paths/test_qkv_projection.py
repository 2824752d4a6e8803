"""The fused query-key-value projection computes transformers' BEiT/ViT attention: checked against the attention
formula written out in float64, with its gradients, for each attention implementation, and in the MFM models."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_config
from plain_step import plain_model
from torch.overrides import TorchFunctionMode
from transformers import BeitConfig, BeitModel, ViTConfig
from transformers.models.beit.modeling_beit import BeitAttention
from transformers.models.vit.modeling_vit import ViTAttention

from modeling_mfm import MFMForPreTraining, MFMModel
from modeling_mfm.fast_paths import apply_fast_paths, image_attention, qkv_projection
from modeling_mfm.fast_paths.qkv_projection import fuse_qkv_projections


def is_fused(module: torch.nn.Module) -> bool:
    return type(module).__name__ in ("FusedQKVBeitAttention", "FusedQKVViTAttention")


@pytest.fixture
def fused_on_cpu(monkeypatch):
    """The fused GEMM also on the CPU (by default only CUDA devices use it, where it is faster)."""
    monkeypatch.setattr(qkv_projection, "FUSED_DEVICE_TYPES", ("cuda", "cpu"))


def attention_by_hand(attention, hidden: torch.Tensor) -> torch.Tensor:
    """softmax(q kᵀ / sqrt(d)) v per head, then the output projection."""
    batch, tokens, _ = hidden.shape

    def heads(projection):
        return projection(hidden).view(batch, tokens, -1, attention.head_dim).transpose(1, 2)

    query, key, value = heads(attention.q_proj), heads(attention.k_proj), heads(attention.v_proj)
    weights = torch.softmax(query @ key.transpose(-1, -2) / attention.head_dim**0.5, dim=-1)
    return attention.o_proj((weights @ value).transpose(1, 2).reshape(batch, tokens, -1))


def make_attention(kind: str, implementation: str, qkv_bias: bool) -> torch.nn.Module:
    if kind == "beit":  # BEiT: query and value biases, none on the keys
        config = BeitConfig(hidden_size=24, num_attention_heads=3, attention_probs_dropout_prob=0.0)
        attention = BeitAttention(config)
    else:
        config = ViTConfig(hidden_size=24, num_attention_heads=3, qkv_bias=qkv_bias, attention_probs_dropout_prob=0.0)
        attention = ViTAttention(config)
    config._attn_implementation = implementation
    return attention.double()


@pytest.mark.parametrize("implementation", ["eager", "sdpa", "mfm_image_sdpa"])
@pytest.mark.parametrize("kind,qkv_bias", [("beit", True), ("vit", True), ("vit", False)])
def test_fused_projection_is_the_attention_with_its_gradients(kind, qkv_bias, implementation, fused_on_cpu):
    image_attention.register()  # mfm_image_sdpa
    torch.manual_seed(0)
    attention = make_attention(kind, implementation, qkv_bias)
    assert (attention.k_proj.bias is None) == (kind == "beit" or not qkv_bias)
    hidden = torch.randn(2, 5, 24, dtype=torch.float64)
    expected = attention_by_hand(attention, hidden)
    tolerance = 1e-6 if implementation == "eager" else 1e-10  # transformers' eager softmax runs in float32
    parameters = list(attention.parameters())
    upstream = torch.randn_like(expected)
    expected_grads = torch.autograd.grad((expected * upstream).sum(), parameters)
    separate = attention(hidden)[0]

    count, undo = fuse_qkv_projections(attention)
    assert count == 1 and is_fused(attention)
    assert type(attention).__bases__ == ((BeitAttention,) if kind == "beit" else (ViTAttention,))
    assert list(attention.parameters()) == parameters  # the same tensors, nothing re-created
    actual, weights = attention(hidden)
    torch.testing.assert_close(actual, expected, rtol=tolerance, atol=tolerance)
    torch.testing.assert_close(actual, separate, rtol=1e-12, atol=1e-12)
    for got, want in zip(torch.autograd.grad((actual * upstream).sum(), parameters), expected_grads):
        torch.testing.assert_close(got, want, rtol=tolerance, atol=tolerance)
    if implementation == "eager":  # the attention probabilities are still returned
        assert weights.shape == (2, 3, 5, 5)
        torch.testing.assert_close(weights.sum(-1), torch.ones(2, 3, 5, dtype=torch.float64))

    undo()
    assert type(attention) in (BeitAttention, ViTAttention)
    torch.testing.assert_close(attention(hidden)[0], separate, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backbone", ["beit", "vit"])
def test_mfm_encoders_use_the_fused_projection_with_transformers_parameter_names(backbone):
    config = tiny_config(backbone)
    config._attn_implementation = "eager"  # SDPA returns no attention probabilities
    model = MFMModel(config, add_pooling_layer=False)  # the encoder as pre-trained (final LayerNorm included)
    apply_fast_paths(model)
    attentions = [m for m in model.modules() if isinstance(m, (BeitAttention, ViTAttention))]
    assert attentions and all(is_fused(m) for m in attentions)
    native = {name.removeprefix("backbone.") for name in model.state_dict() if name.startswith("backbone.")}
    if backbone == "beit":
        reference = BeitModel(BeitConfig(**config.backbone_config.to_dict()), add_pooling_layer=False)
        assert native == set(reference.state_dict())
    # output_attentions still records every layer's attention probabilities
    outputs = model(torch.randn(2, 3, 32, 32), output_attentions=True)
    assert len(outputs.attentions) == config.backbone_config.num_hidden_layers
    tokens = (32 // config.backbone_config.patch_size) ** 2 + 1
    assert outputs.attentions[0].shape == (2, config.backbone_config.num_attention_heads, tokens, tokens)


def test_the_model_and_the_plain_baseline_are_stock():
    model = MFMForPreTraining(tiny_config(decoder_depth=1))
    assert not any(is_fused(m) for m in model.modules())
    plain = plain_model(tiny_config())
    assert not any(is_fused(m) for m in plain.modules())


def test_pretraining_loss_is_unchanged_by_the_fusion(fused_on_cpu):
    torch.manual_seed(0)
    model = MFMForPreTraining(tiny_config(decoder_depth=1)).double().eval()
    pixels = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    mask = model(pixel_values=pixels).frequency_mask
    separate = model(pixel_values=pixels, frequency_mask=mask).loss
    apply_fast_paths(model)
    fused = model(pixel_values=pixels, frequency_mask=mask).loss
    torch.testing.assert_close(fused, separate, rtol=1e-12, atol=1e-12)


class LinearShapes(TorchFunctionMode):
    """Records the weight shape of every F.linear call."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.nn.functional.linear:
            self.shapes.append(tuple(args[1].shape))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("fused_devices,expected_shapes", [
    (("cuda",), [(24, 24)] * 4),  # three projections and the output one
    (("cuda", "cpu"), [(72, 24), (24, 24)]),  # one fused GEMM and the output projection
])
def test_only_the_listed_devices_take_the_fused_gemm(monkeypatch, fused_devices, expected_shapes):
    monkeypatch.setattr(qkv_projection, "FUSED_DEVICE_TYPES", fused_devices)
    attention = make_attention("vit", "sdpa", qkv_bias=True)
    fuse_qkv_projections(attention)
    with LinearShapes() as recorded:
        attention(torch.randn(1, 4, 24, dtype=torch.float64))
    assert recorded.shapes == expected_shapes


@pytest.mark.parametrize("backbone", ["beit", "vit"])
def test_fused_encoder_compiles_without_graph_breaks(backbone, fused_on_cpu):
    # the fused path is the one compiled on GPUs: one graph, and the compiled loss is the eager one
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = MFMForPreTraining(tiny_config(backbone, decoder_depth=1)).train()
    apply_fast_paths(model)
    pixels = torch.randn(2, 3, 32, 32)
    explanation = torch._dynamo.explain(model)(pixels)
    assert explanation.graph_break_count == 0, [r.reason for r in explanation.break_reasons]
    mask = model(pixel_values=pixels).frequency_mask
    torch._dynamo.reset()
    compiled = torch.compile(model)(pixel_values=pixels, frequency_mask=mask).loss
    torch.testing.assert_close(compiled, model(pixel_values=pixels, frequency_mask=mask).loss, rtol=1e-5, atol=1e-6)


class LowRankAdapted(torch.nn.Module):
    """A LoRA-style wrapper as PEFT builds one: the base layer plus a low-rank update, exposing the base weight."""

    def __init__(self, base: torch.nn.Linear) -> None:
        super().__init__()
        self.base_layer = base
        self.down = torch.nn.Linear(base.in_features, 2, bias=False).double()
        self.up = torch.nn.Linear(2, base.out_features, bias=False).double()
        torch.nn.init.normal_(self.up.weight)

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.base_layer(hidden) + self.up(self.down(hidden))


def test_adapted_or_hooked_projections_are_not_bypassed(fused_on_cpu):
    # the fused GEMM reads only the weights: an adapter's update or a hook on a projection must still take effect
    torch.manual_seed(0)
    attention = make_attention("beit", "sdpa", qkv_bias=True)
    hidden = torch.randn(2, 5, 24, dtype=torch.float64)
    attention.v_proj = LowRankAdapted(attention.v_proj)
    expected = attention_by_hand(attention, hidden)
    fuse_qkv_projections(attention)
    torch.testing.assert_close(attention(hidden)[0], expected, rtol=1e-10, atol=1e-10)

    attention.v_proj = attention.v_proj.base_layer
    seen = []
    handle = attention.k_proj.register_forward_hook(lambda module, args, output: seen.append(output.shape))
    attention(hidden)
    assert seen == [(2, 5, 24)]
    handle.remove()
    calls = []
    handle = attention.k_proj.register_forward_pre_hook(lambda *_: calls.append(1))
    attention(hidden)
    assert calls == [1]
    handle.remove()
    # a forward replaced on the instance, as Accelerate's hooks do for offloaded weights
    from accelerate.hooks import ModelHook, add_hook_to_module, remove_hook_from_module

    class CountCalls(ModelHook):
        def pre_forward(self, module, *args, **kwargs):
            calls.append(2)
            return args, kwargs

    add_hook_to_module(attention.q_proj, CountCalls())
    attention(hidden)
    assert calls == [1, 2]
    remove_hook_from_module(attention.q_proj)  # plain layers again: the fused GEMM again
    with LinearShapes() as recorded:
        attention(hidden)
    assert recorded.shapes == [(72, 24), (24, 24)]
