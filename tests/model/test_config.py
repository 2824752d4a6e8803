"""MFMConfig: defaults reproduce the official ViT-B/16 config, presets, validation, serialisation."""

from __future__ import annotations

import math

import pytest
from transformers import AutoConfig, BeitConfig, ConvNextConfig, ResNetConfig

from modeling_mfm import MFMConfig, official_mask_radius
from modeling_mfm.configuration_mfm import OFFICIAL_IMAGE_SIZE, OFFICIAL_MASK_RADIUS, merge_overrides


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


def test_one_override_rule_for_presets_and_saved_configs():
    saved = MFMConfig.from_preset("mfm-vit-tiny").to_dict()
    merged = merge_overrides(saved, {"image_size": 64, "mask_radius": 5.0}, {"patch_size": 8})
    assert merged["backbone_config"]["image_size"] == 64 and merged["backbone_config"]["patch_size"] == 8
    assert saved["backbone_config"]["image_size"] == 224  # the caller's dict is left alone
    resnet = merge_overrides({"backbone_config": {"model_type": "resnet", "depths": [1]}}, {"image_size": 64})
    assert resnet["image_size"] == 64 and "image_size" not in resnet["backbone_config"]  # a CNN has no tied size


def test_the_official_mask_radius_keeps_the_ratio_16_at_224():
    assert official_mask_radius(OFFICIAL_IMAGE_SIZE) == OFFICIAL_MASK_RADIUS == MFMConfig().mask_radius == 16
    assert OFFICIAL_IMAGE_SIZE == MFMConfig().image_size == 224
    assert official_mask_radius(64) == 16 * 64 / 224 and official_mask_radius(32) == pytest.approx(2.2857, abs=1e-4)
    # the same share of the spectrum at any size: the radius scales with the side
    assert official_mask_radius(448) == 2 * OFFICIAL_MASK_RADIUS


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(mask_radius=0), "mask_radius must be > 0"),
        (dict(mask_radius=16, mask_outer_radius=10), "mask_outer_radius must be > mask_radius"),
        (dict(low_pass_probability=1.5), r"low_pass_probability must be in \[0.0, 1.0\]"),
        (dict(low_pass_probability=-0.1), "low_pass_probability"),
        (dict(corruption="jpeg"), "corruption must be one of"),
        (dict(loss_on="some"), "loss_on must be"),
        (dict(corruption="sr", loss_on="masked"), "loss_on='masked' needs corruption='mfm'"),
        (dict(patch_factor=3), "patch_factor"),
        (dict(image_mean=[0.5, 0.5]), "image_mean must be a list of 3 numbers"),
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
        (dict(blur_kernel_types=["box"], blur_kernel_probs=[1.0]), "blur_kernel_types has unknown entries"),
        (dict(blur_sigma_x_range=[3.0, 0.2]), "blur_sigma_x_range"),
        (dict(noise_probs=[0.7, 0.7]), "noise_probs"),
        (dict(noise_gaussian_gray_prob=2.0), "noise_gaussian_gray_prob"),
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


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(mask_radius="16"), r"mask_radius must be a number, got '16' \(str\)"),
        (dict(low_pass_probability=True), "low_pass_probability must be a number"),
        (dict(with_matrix="no"), r"with_matrix must be true or false, got 'no'"),
        (dict(mask_radius=float("nan")), "mask_radius must be finite"),
        (dict(mask_outer_radius=float("inf")), "mask_outer_radius must be finite"),
        (dict(loss_gamma=float("nan")), "loss_gamma must be finite"),
        (dict(image_mean=[0.5, float("nan"), 0.5]), "image_mean must be finite"),
        (dict(patch_factor=0), "patch_factor must be >= 1"),
        (dict(sr_factor=2.0), "sr_factor must be an integer"),
        (dict(decoder_hidden_size=0), "decoder_hidden_size must be >= 1"),
        (dict(backbone_config={"model_type": "beit", "patch_size": 0}), "backbone_config.patch_size must be >= 1"),
        (dict(backbone_config={"model_type": "beit", "hidden_size": 0}), "backbone_config.hidden_size must be >= 1"),
        (dict(backbone_config={"model_type": "beit", "hidden_size": 100, "num_attention_heads": 3}),
         r"backbone_config.hidden_size \(100\) must be divisible by backbone_config.num_attention_heads \(3\)"),
        (dict(backbone_config={"model_type": "resnet", "depths": [1, 0, 1, 1]}, image_size=64),
         "backbone_config.depths must be >= 1"),
        (dict(mask_radius=200), "leave nothing for a low-pass filter to remove at image_size 224"),
        (dict(mask_radius=1.1, mask_outer_radius=1.2), "leave nothing"),  # no frequency between the two radii
        (dict(image_size=2**15, backbone_config={"model_type": "resnet"}), "image_size must be <= 16384"),
        (dict(noise_types="gaussian"), "noise_types must be a non-empty list"),
    ],
)
def test_every_field_is_checked_with_a_value_error_naming_it(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MFMConfig(**kwargs)


def test_loss_on_follows_the_corruption():
    assert MFMConfig().loss_on == "masked"
    for pretext in ("sr", "deblur", "denoise"):
        assert MFMConfig(corruption=pretext).loss_on == "all"
    assert MFMConfig(loss_on="all").loss_on == "all"  # MFM with the plain mean, as asked


def test_unknown_keys_are_named_and_transformers_keys_are_not(caplog):
    with caplog.at_level("WARNING", logger="modeling_mfm.configuration_mfm"):
        config = MFMConfig(mask_raduis=3, num_labels=4, output_hidden_states=True, torch_dtype="float32")
    assert [r.getMessage() for r in caplog.records] == [
        "MFMConfig: unknown field(s) ['mask_raduis'] (kept, but no MFM code reads them; a typo?)"]
    assert config.num_labels == 4 and config.mask_radius == 16


def test_an_absurd_config_json_fails_fast_and_an_old_one_still_loads(tmp_path):
    import json
    import tracemalloc

    path = tmp_path / "config.json"
    config = MFMConfig.from_preset("mfm-vit-base").to_dict()
    config["backbone_config"]["num_hidden_layers"] = 10**6
    path.write_text(json.dumps(config))
    MFMConfig.from_preset("mfm-vit-base").save_pretrained(tmp_path / "base")
    MFMConfig.from_pretrained(tmp_path / "base")  # imports and caches warmed before measuring
    tracemalloc.start()
    with pytest.raises(ValueError, match=r"about 7.1e\+12 parameters"):
        MFMConfig.from_pretrained(tmp_path)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    # counted, not built: only transformers' per-layer stage names of the backbone config (~76 MiB for 10**6
    # layers); the weights would need 26 TiB
    assert peak < 256 * 2**20, peak
    old = MFMConfig.from_preset("mfm-vit-base").to_dict()
    old.update(label_smoothing=0.1, loss_on="masked")  # written by an older release: smoothing in the model config
    path.write_text(json.dumps(old))
    loaded = MFMConfig.from_pretrained(tmp_path)
    assert not hasattr(loaded, "label_smoothing") and loaded.loss_on == "masked"
