"""The encoders' SDPA never gets a materialised attention mask, even where torch reports is_exporting() under
torch.compile (torch 2.7 to 2.13), so that flash / cuDNN attention stay usable in the compiled step."""

from __future__ import annotations

import pytest
import torch
import transformers.masking_utils
from conftest import tiny_config
from transformers import AutoModel

from modeling_mfm import MFMForPreTraining, MFMModel
from modeling_mfm.fast_paths import apply_fast_paths
from modeling_mfm.fast_paths.image_attention import IMAGE_SDPA, image_attention_implementation


@pytest.fixture
def exporting_reported(monkeypatch):
    """What transformers' mask code reads inside torch.compile on torch 2.7-2.13, where torch.compiler.is_exporting()
    is true under plain compilation too (pytorch#176347)."""
    monkeypatch.setattr(transformers.masking_utils, "is_torchdynamo_exporting", lambda: True)


@pytest.fixture
def attention_masks(monkeypatch):
    """The attn_mask of every SDPA call."""
    seen = []
    real = torch.nn.functional.scaled_dot_product_attention

    def spy(*args, **kwargs):
        seen.append(kwargs.get("attn_mask"))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    return seen


@pytest.mark.parametrize("backbone", ["beit", "vit"])
def test_encoder_attention_has_no_mask_when_exporting_is_reported(backbone, exporting_reported, attention_masks):
    config = tiny_config(backbone)
    images = torch.randn(2, 3, 32, 32)
    # the stock transformers encoder materialises an all-True mask in this situation (the upstream behaviour)...
    stock = AutoModel.from_config(tiny_config(backbone).backbone_config, attn_implementation="sdpa").eval()
    with torch.no_grad():
        stock(images)
    assert attention_masks and all(mask is not None for mask in attention_masks)
    attention_masks.clear()
    # ...ours does not, and computes the same features
    model = MFMModel(config, add_pooling_layer=False).eval()  # as pre-trained: final LayerNorm included
    apply_fast_paths(model)
    assert model.backbone.config._attn_implementation == IMAGE_SDPA
    assert config.backbone_config._attn_implementation in (None, "sdpa")  # a private copy: the caller's is untouched
    model.backbone.load_state_dict(stock.state_dict(), strict=False)
    with torch.no_grad():
        ours = model(images).last_hidden_state
        reference = stock(images).last_hidden_state
    assert len(attention_masks) >= config.backbone_config.num_hidden_layers
    assert all(mask is None for mask in attention_masks[: config.backbone_config.num_hidden_layers])
    torch.testing.assert_close(model.backbone(images).last_hidden_state, reference)
    assert ours.shape[:2] == reference.shape[:2]


def test_compiled_graph_calls_sdpa_without_a_mask(exporting_reported):
    """The graph dynamo captures for the whole pre-training forward: every SDPA call has attn_mask None."""
    calls = []

    def capture(graph_module, example_inputs):
        calls.extend(node for node in graph_module.graph.nodes
                     if node.op == "call_function" and "scaled_dot_product_attention" in str(node.target))
        return graph_module.forward

    model = MFMForPreTraining(tiny_config("beit", decoder_depth=1, decoder_hidden_size=32, decoder_num_attention_heads=2)).train()
    apply_fast_paths(model)
    torch._dynamo.reset()
    try:
        torch.compile(model, backend=capture)(pixel_values=torch.randn(2, 3, 32, 32)).loss.backward()
    finally:
        torch._dynamo.reset()
    assert len(calls) == model.config.backbone_config.num_hidden_layers + model.config.decoder_depth
    assert all(node.kwargs.get("attn_mask") is None for node in calls)


def test_other_implementations_are_kept():
    assert image_attention_implementation("sdpa") == IMAGE_SDPA
    assert image_attention_implementation(None) == IMAGE_SDPA
    assert image_attention_implementation("eager") == "eager"
    model = MFMForPreTraining._from_config(tiny_config("beit"), attn_implementation="eager")
    apply_fast_paths(model)
    assert model.mfm.backbone.config._attn_implementation == "eager"
