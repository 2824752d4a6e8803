"""MFMConfig: defaults reproduce the official ViT-B/16 config, presets, validation, serialisation."""

from __future__ import annotations

import math

import pytest
from transformers import AutoConfig, BeitConfig, ConvNextConfig, ResNetConfig

from modeling_mfm import MFMConfig


def test_defaults_are_the_official_vit_base_mfm_config():
    config = MFMConfig()
    backbone = config.backbone_config
    assert isinstance(backbone, BeitConfig)
    assert (backbone.hidden_size, backbone.num_hidden_layers, backbone.num_attention_heads) == (768, 12, 12)
    assert backbone.intermediate_size == 3072 and backbone.patch_size == 16 and backbone.image_size == 224
    assert backbone.layer_norm_eps == 1e-6 and backbone.layer_scale_init_value == 0
    assert backbone.use_absolute_position_embeddings and not backbone.use_relative_position_bias
    assert not backbone.use_mask_token and not backbone.use_mean_pooling
    assert config.image_size == 224 and config.encoder_stride == 16
    assert (config.mask_radius, config.mask_outer_radius, config.low_pass_probability) == (16, None, 0.5)
    assert config.corruption == "mfm" and config.loss_on == "masked"
    assert (config.loss_gamma, config.matrix_gamma, config.patch_factor) == (1.0, 1.0, 1)
    assert not (config.ave_spectrum or config.with_matrix or config.log_matrix or config.batch_matrix)
    assert config.decoder_depth == 0
    assert config.image_mean == [0.485, 0.456, 0.406] and config.image_std == [0.229, 0.224, 0.225]
    assert config.sr_factor == 8 and config.blur_rotation_range == [-math.pi, math.pi]


@pytest.mark.parametrize(
    "name,backbone_class,hidden,stride,low_pass",
    [
        ("mfm-vit-small", BeitConfig, 384, 16, 0.5),
        ("mfm-vit-base", BeitConfig, 768, 16, 0.5),
        ("mfm-vit-large", BeitConfig, 1024, 16, 0.5),
        ("mfm-resnet50", ResNetConfig, 2048, 32, 0.3),
        ("mfm-convnext-tiny", ConvNextConfig, 768, 32, 0.5),
        ("mfm-convnext-base", ConvNextConfig, 1024, 32, 0.5),
    ],
)
def test_presets(name, backbone_class, hidden, stride, low_pass):
    config = MFMConfig.from_preset(name)
    assert isinstance(config.backbone_config, backbone_class)
    assert config.encoder_hidden_size == hidden and config.encoder_stride == stride
    assert config.low_pass_probability == low_pass
    assert MFMConfig.from_pretrained(name).to_dict() == config.to_dict()


def test_resnet50_preset_is_timm_resnet50():
    backbone = MFMConfig.from_preset("mfm-resnet50").backbone_config
    assert backbone.depths == [3, 4, 6, 3] and backbone.layer_type == "bottleneck"
    assert not backbone.downsample_in_bottleneck and backbone.embedding_size == 64


def test_restoration_presets_use_the_plain_mean():
    for pretext in ("sr", "deblur", "denoise"):
        config = MFMConfig.from_preset(f"mfm-vit-base-{pretext}")
        assert config.corruption == pretext and config.loss_on == "all"
    assert MFMConfig.from_preset("mfm-resnet50-sr").low_pass_probability == 0.3
    # the released configs behind the published numbers: Gaussian blur sigma 5, colour Gaussian noise sigma 75/255
    deblur = MFMConfig.from_preset("mfm-resnet50-deblur")
    assert deblur.blur_kernel_types == ["iso"] and deblur.blur_sigma_x_range == [5.0, 5.0]
    denoise = MFMConfig.from_preset("mfm-vit-base-denoise")
    assert denoise.noise_types == ["gaussian"] and denoise.noise_gaussian_sigma_range == [75.0, 75.0]
    assert denoise.noise_gaussian_gray_prob == 0.0
    # the field defaults stay the official code's general defaults
    assert MFMConfig(corruption="deblur", loss_on="all").blur_kernel_types[-1] == "sinc"


def test_preset_overrides_reach_the_backbone():
    config = MFMConfig.from_preset("mfm-vit-small", image_size=96, mask_radius=8, backbone_overrides={"patch_size": 8})
    assert config.image_size == config.backbone_config.image_size == 96
    assert config.backbone_config.patch_size == 8 and config.mask_radius == 8
    with pytest.raises(ValueError, match="unknown preset 'mfm-vit-huge'"):
        MFMConfig.from_preset("mfm-vit-huge")


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(mask_radius=0), "mask_radius must be > 0"),
        (dict(mask_radius=16, mask_outer_radius=10), "mask_outer_radius must be > mask_radius"),
        (dict(low_pass_probability=1.5), r"low_pass_probability must be in \[0.0, 1.0\]"),
        (dict(low_pass_probability=-0.1), "low_pass_probability"),
        (dict(corruption="jpeg"), "corruption must be one of"),
        (dict(loss_on="some"), "loss_on must be"),
        (dict(corruption="sr"), "loss_on='masked' needs corruption='mfm'"),
        (dict(patch_factor=3), "patch_factor"),
        (dict(image_mean=[0.5, 0.5]), "image_mean needs 3 values"),
        (dict(image_std=[0.2, 0.0, 0.2]), "image_std must be positive"),
        (dict(backbone_config={"model_type": "bert"}), "backbone_config.model_type must be one of"),
        (dict(backbone_config={"hidden_size": 8}), "needs a 'model_type'"),
        (dict(image_size=100, backbone_config={"model_type": "resnet"}), "divisible by the encoder stride"),
        (dict(image_size=64), r"differs from backbone_config.image_size \(224\)"),
        (dict(decoder_depth=-1), "decoder_depth"),
        (dict(decoder_depth=2, backbone_config={"model_type": "resnet"}), "needs a beit or vit backbone"),
        (dict(decoder_depth=2, decoder_hidden_size=100, decoder_num_attention_heads=16), "divisible"),
        (dict(sr_factor=5), "sr_factor"),
        (dict(blur_kernel_sizes=[8]), "odd"),
        (dict(blur_kernel_probs=[1.0]), "blur_kernel_probs"),
        (dict(blur_kernel_types=["box"], blur_kernel_probs=[1.0]), "unknown kernels"),
        (dict(blur_sigma_x_range=[3.0, 0.2]), "blur_sigma_x_range"),
        (dict(noise_probs=[0.7, 0.7]), "noise_probs"),
        (dict(noise_gaussian_gray_prob=2.0), "noise_gaussian_gray_prob"),
        (dict(label_smoothing=1.5), "label_smoothing"),
    ],
)
def test_validation_names_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MFMConfig(**kwargs)


def test_backbone_given_as_object_or_dict():
    from_object = MFMConfig(backbone_config=ResNetConfig(depths=[1, 1, 1, 1]), image_size=64)
    from_dict = MFMConfig(backbone_config={"model_type": "resnet", "depths": [1, 1, 1, 1]}, image_size=64)
    assert from_object.backbone_config.to_dict() == from_dict.backbone_config.to_dict()
    assert from_object.image_size == 64


def comparable(config: MFMConfig) -> dict:
    return {k: v for k, v in config.to_dict().items() if k not in ("_name_or_path", "auto_map", "transformers_version")}


def test_round_trips(tmp_path):
    config = MFMConfig.from_preset("mfm-resnet50", mask_radius=24, mask_outer_radius=60, with_matrix=True)
    again = MFMConfig.from_dict(config.to_dict())
    assert again.to_dict() == config.to_dict()
    config.save_pretrained(tmp_path)
    loaded = MFMConfig.from_pretrained(tmp_path)
    assert comparable(loaded) == comparable(config)
    assert isinstance(loaded.backbone_config, ResNetConfig)
    assert (loaded.mask_radius, loaded.mask_outer_radius, loaded.with_matrix) == (24, 60, True)
    import modeling_mfm  # noqa: F401  (registers "mfm" with AutoConfig)

    auto = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(auto, MFMConfig) and comparable(auto) == comparable(config)
