"""What every transformers model promises, checked for every backbone (BEiT, ViT, ResNet, ConvNeXt, ConvNeXtV2) and
every head (MFMModel, MFMForPreTraining, MFMForImageClassification): save/load round trip, tuple outputs, hidden
states and attentions, gradient checkpointing, torch.export, eval determinism and PEFT adapters. (Remote code without
the package: model/test_remote_code.py.)"""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_BACKBONES, tiny_config
from peft import LoraConfig, get_peft_model

from modeling_mfm import MFMForImageClassification, MFMForPreTraining, MFMModel, low_pass_mask
from modeling_mfm.fast_paths import apply_fast_paths
from modeling_mfm.training.models.model_factory import enable_activation_checkpointing

BACKBONES = list(TINY_BACKBONES)
HEADS = {"encoder": MFMModel, "pretraining": MFMForPreTraining, "classifier": MFMForImageClassification}
X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
MASK = torch.stack([low_pass_mask(32, 32, 4), 1 - low_pass_mask(32, 32, 4)])


def build(backbone: str, head: str, **overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    return HEADS[head](tiny_config(backbone, num_labels=3, **overrides))


def inputs(head: str) -> dict:
    return {"pixel_values": X, "frequency_mask": MASK} if head == "pretraining" else {"pixel_values": X}


def first(output) -> torch.Tensor:
    """The main output: the encoder's tokens / map, the reconstruction, or the logits."""
    return getattr(output, "reconstruction", None) if hasattr(output, "reconstruction") else (
        output.logits if hasattr(output, "logits") else output.last_hidden_state)


@pytest.mark.parametrize("head", list(HEADS))
@pytest.mark.parametrize("backbone", BACKBONES)
def test_round_trip_tuples_and_eval_determinism(backbone, head, tmp_path):
    model = build(backbone, head).eval()
    with torch.no_grad():
        output = model(**inputs(head))
        again = model(**inputs(head))
        as_tuple = model(**inputs(head), return_dict=False)
    for name, value in output.items():  # eval mode: the same input gives the same output
        torch.testing.assert_close(again[name], value, atol=0, rtol=0)
    assert isinstance(as_tuple, tuple) and len(as_tuple) == len(output.to_tuple())
    for got, want in zip(as_tuple, output.to_tuple()):
        torch.testing.assert_close(got, want, atol=0, rtol=0)
    model.save_pretrained(tmp_path)
    loaded = HEADS[head].from_pretrained(tmp_path).eval()
    with torch.no_grad():
        reloaded = loaded(**inputs(head))
    for name, value in output.items():
        torch.testing.assert_close(reloaded[name], value, atol=0, rtol=0)


@pytest.mark.parametrize("head", list(HEADS))
@pytest.mark.parametrize("backbone", BACKBONES)
def test_hidden_states_and_attentions(backbone, head):
    model = build(backbone, head).eval()
    config = model.config
    model.set_attn_implementation("eager") if config.is_vit else None  # SDPA returns no attention probabilities
    with torch.no_grad():
        output = model(**inputs(head), output_hidden_states=True, output_attentions=True)
    if config.is_vit:
        layers = config.backbone_config.num_hidden_layers
        assert len(output.hidden_states) == layers + 1 and output.hidden_states[0].shape == (2, 17, 32)
        assert len(output.attentions) == layers and output.attentions[0].shape == (2, 2, 17, 17)
        torch.testing.assert_close(output.attentions[-1].sum(-1), torch.ones(2, 2, 17))
    else:
        assert len(output.hidden_states) == len(config.backbone_config.depths) + 1
        assert output.hidden_states[-1].shape[-2:] == (1, 1)
        assert not output.attentions


@pytest.mark.parametrize("head", ["pretraining", "classifier"])
@pytest.mark.parametrize("backbone", BACKBONES)
def test_gradient_checkpointing_gives_the_same_gradients(backbone, head):
    model = build(backbone, head).train()
    labels = {"labels": torch.tensor([0, 2])} if head == "classifier" else {}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model(**inputs(head), **labels).loss.backward()
    reference = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.load_state_dict(state)  # BatchNorm running stats back to the same start
    enable_activation_checkpointing(model)
    model(**inputs(head), **labels).loss.backward()
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, reference[name], atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("head", list(HEADS))
@pytest.mark.parametrize("backbone", BACKBONES)
def test_torch_export(backbone, head):
    model = build(backbone, head).eval()
    with torch.no_grad():
        expected = model(**inputs(head))
        program = torch.export.export(model, args=(), kwargs=inputs(head))
        exported = program.module()(**inputs(head))
    torch.testing.assert_close(first(exported), first(expected), atol=1e-5, rtol=1e-5)


def lora_targets(backbone: str, head: str) -> str:
    """The attention's query and value projections (ViTs) or the last stage's convolutions (CNNs: ConvNeXt's
    downsampling one, as its blocks' layer scale starts at 1e-6), and the decoder's projection."""
    encoder = {"beit": r".*attention\.(q_proj|v_proj)", "vit": r".*attention\.(q_proj|v_proj)",
               "resnet": r".*stages\.3\..*convolution"}.get(backbone, r".*stages\.3\.downsampling_layer\.1")
    return encoder + (r"|decoder\.projection" if head == "pretraining" else "")


@pytest.mark.parametrize("head", ["pretraining", "classifier"])
@pytest.mark.parametrize("backbone", BACKBONES)
def test_lora_adapters_change_the_output_also_with_fast_paths(backbone, head):
    model = build(backbone, head).eval()
    with torch.no_grad():
        base = first(model(**inputs(head)))
    config = LoraConfig(r=2, lora_alpha=4, target_modules=lora_targets(backbone, head), init_lora_weights=False)
    adapted_model = get_peft_model(model, config).eval()
    adapted = [name for name, _ in adapted_model.named_parameters() if ".lora_A." in name]
    assert any((".decoder.projection." in name) == (head == "pretraining") for name in adapted)
    with torch.no_grad():
        with_lora = first(adapted_model(**inputs(head)))
        assert (with_lora - base).abs().max() > 1e-3  # the adapter takes effect...
        apply_fast_paths(model)
        torch.testing.assert_close(first(adapted_model(**inputs(head))), with_lora, atol=1e-5, rtol=1e-5)  # with them
    trainable = [name for name, p in adapted_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name or "classifier" in name for name in trainable)


@pytest.mark.parametrize("backbone", BACKBONES)
def test_no_split_modules_name_every_block(backbone):
    """device_map="auto" keeps each backbone block (and each decoder block) on one device."""
    decoder = {"decoder_depth": 1, "decoder_hidden_size": 16, "decoder_num_attention_heads": 2}
    model = build(backbone, "pretraining", **(decoder if backbone in ("beit", "vit") else {}))
    blocks = {"beit": "BeitLayer", "vit": "ViTLayer", "resnet": "ResNetConvLayer", "convnext": "ConvNextLayer",
              "convnextv2": "ConvNextV2Layer"}[backbone]
    present = {type(module).__name__ for module in model.modules()}
    assert blocks in present and blocks in set(model._no_split_modules)
    assert ("MFMDecoderLayer" in present) == (backbone in ("beit", "vit"))
    assert "MFMDecoderLayer" in set(model._no_split_modules)
