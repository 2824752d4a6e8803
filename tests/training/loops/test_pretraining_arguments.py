"""Command-line arguments (MFMConfig fields as flags, demo vs official defaults) and building the model."""

from __future__ import annotations

import inspect
import json
import os

import pytest
import torch

from modeling_mfm import MFMConfig, MFMForPreTraining
from modeling_mfm.fast_paths import apply_fast_paths, remove_fast_paths
from modeling_mfm.training.loops.pretraining_arguments import (
    DEMO_DEFAULTS,
    OFFICIAL_DEFAULTS,
    build_argument_parser,
    is_demo_run,
    parse_arguments,
    parse_backbone_overrides,
    parse_config_overrides,
    resolve_defaults,
)
from modeling_mfm.training.models.model_factory import (
    build_config,
    build_model,
    cudnn_autotuning,
    override_config,
    preferred_memory_format,
)


def test_every_config_field_is_a_flag():
    options = {a.dest for a in build_argument_parser()._actions}
    own_fields = [name for name in inspect.signature(MFMConfig.__init__).parameters
                  if name not in ("self", "kwargs", "backbone_config")]
    assert own_fields and set(own_fields) <= options


def test_overrides_are_typed_and_only_the_given_ones():
    args, overrides = parse_arguments([
        "--mask_radius", "24", "--corruption", "sr", "--with_matrix", "true", "--image_mean", "0.5", "0.5", "0.5",
        "--no_jpeg_draft", "--train_dir", "x",
    ])
    assert overrides == {"mask_radius": 24.0, "corruption": "sr", "with_matrix": True, "image_mean": [0.5] * 3}
    assert args.jpeg_draft is False and args.train_dir == "x"


def test_demo_and_official_defaults():
    demo = resolve_defaults(parse_arguments([])[0])
    assert is_demo_run(demo)
    assert demo.preset == DEMO_DEFAULTS["preset"] and demo.max_train_steps == DEMO_DEFAULTS["max_train_steps"]
    official = resolve_defaults(parse_arguments(["--train_dir", "data", "--per_device_train_batch_size", "64"])[0])
    assert not is_demo_run(official)
    assert official.preset == "mfm-vit-base" and official.num_train_epochs == 300 and official.warmup_epochs == 20
    assert official.base_learning_rate == OFFICIAL_DEFAULTS["base_learning_rate"] == 3e-4
    assert official.per_device_train_batch_size == 64  # given values win
    assert (official.adam_beta1, official.adam_beta2, official.weight_decay, official.max_grad_norm) == (
        0.9, 0.95, 0.05, 3.0)
    from_file = resolve_defaults(parse_arguments(["--train_dir", "d", "--config_file", "c.json"])[0])
    assert from_file.preset is None


def test_backbone_overrides_json():
    assert parse_backbone_overrides('{"num_hidden_layers": 2}') == {"num_hidden_layers": 2}
    assert parse_backbone_overrides(None) == {}
    with pytest.raises(ValueError, match="JSON object"):
        parse_backbone_overrides("[1, 2]")
    with pytest.raises(ValueError, match="JSON object"):
        parse_backbone_overrides("{num_hidden_layers: 2}")


def test_the_preset_flag_and_its_old_name_model():
    args, _ = parse_arguments(["--preset", "mfm-vit-small", "--train_dir", "x"])
    assert resolve_defaults(args).preset == "mfm-vit-small"
    with pytest.warns(FutureWarning, match="--model is deprecated.*use --preset"):
        old, _ = parse_arguments(["--model", "mfm-vit-small", "--train_dir", "x"])
    assert old.preset == "mfm-vit-small"
    # --model_name_or_path is its own flag, not the old name of --preset
    continued, _ = parse_arguments(["--model_name_or_path", "some/folder", "--train_dir", "x"])
    assert continued.model_name_or_path == "some/folder" and resolve_defaults(continued).preset is None


def test_config_overrides_argument_means_what_it_means_in_fine_tuning(monkeypatch):
    """--config_overrides: a JSON object of MFMConfig fields (backbone_overrides among them), as in run_finetune.py;
    the per-field flags and --backbone_overrides win over it."""
    from modeling_mfm.training.loops import pretrain

    text = json.dumps({"image_size": 64, "mask_radius": 5.0, "backbone_overrides": {"num_hidden_layers": 2,
                                                                                    "patch_size": 8}})
    assert parse_config_overrides(text) == json.loads(text) and parse_config_overrides(None) == {}
    for bad, match in (("[1]", "JSON object"), ('{"mask_raduis": 3}', "unknown MFMConfig fields"),
                       ('{"backbone_overrides": 2}', "backbone_overrides must be a JSON object")):
        with pytest.raises(ValueError, match=match):
            parse_config_overrides(bad)

    args, flags = parse_arguments(["--preset", "mfm-vit-tiny", "--train_dir", "x", "--config_overrides", text,
                                   "--mask_radius", "6", "--backbone_overrides", '{"num_hidden_layers": 3}'])
    seen, real_build_config = {}, pretrain.build_config

    def recording_build_config(*sources):
        seen["sources"] = sources
        return real_build_config(*sources)

    monkeypatch.setattr(pretrain, "build_config", recording_build_config)
    config = pretrain._model_config(args, flags, accelerator=None)
    assert (config.image_size, config.mask_radius, config.backbone_config.num_hidden_layers) == (64, 6.0, 3)
    preset, config_file, model_name_or_path, overrides, backbone_overrides = seen["sources"]
    assert (preset, config_file, model_name_or_path) == ("mfm-vit-tiny", None, None)
    assert overrides == {"image_size": 64, "mask_radius": 6.0}
    assert backbone_overrides == {"num_hidden_layers": 3, "patch_size": 8}


def test_build_config_sources_and_overrides(tmp_path, tiny_config_factory):
    config = build_config(preset="mfm-vit-tiny", overrides={"image_size": 64, "mask_radius": 5.0},
                          backbone_overrides={"num_hidden_layers": 2})
    assert (config.image_size, config.backbone_config.image_size, config.mask_radius) == (64, 64, 5.0)
    assert config.backbone_config.num_hidden_layers == 2
    path = tmp_path / "config.json"
    tiny_config_factory("beit").to_json_file(str(path))
    from_file = build_config(config_file=str(path), overrides={"corruption": "sr", "loss_on": "all",
                                                               "image_size": 64})
    assert from_file.corruption == "sr" and from_file.backbone_config.image_size == 64
    assert from_file.backbone_config.hidden_size == 32
    with pytest.raises(ValueError, match="exactly one"):
        build_config(preset="mfm-vit-tiny", config_file=str(path))
    with pytest.raises(ValueError, match="unknown preset"):
        build_config(preset="mfm-vit-gigantic")
    with pytest.raises(ValueError, match="divisible by the encoder stride"):
        build_config(config_file=str(path), overrides={"image_size": 30})
    with pytest.raises(ValueError, match="does not exist"):
        build_config(config_file=str(tmp_path / "missing.json"))
    with pytest.raises(ValueError, match="unknown MFMConfig fields"):
        override_config(from_file, {"mask_raduis": 3})


def test_continue_from_a_saved_model(tmp_path, tiny_config_factory):
    torch.manual_seed(0)
    saved = MFMForPreTraining(tiny_config_factory("beit"))
    saved.save_pretrained(tmp_path / "model")
    config = build_config(model_name_or_path=str(tmp_path / "model"), overrides={"mask_radius": 6.0})
    model = build_model(config, str(tmp_path / "model"))
    assert model.config.mask_radius == 6.0
    for (name, a), (_, b) in zip(saved.state_dict().items(), model.state_dict().items()):
        assert torch.equal(a, b), name
    with pytest.raises(ValueError, match="change parameter shapes"):
        build_config(model_name_or_path=str(tmp_path / "model"), overrides={"image_size": 64})


def test_cnns_train_channels_last_on_cuda_and_resnets_on_cpus_too(tiny_config_factory):
    expected = {  # backbone: (cuda, cpu, mps)
        "resnet": (torch.channels_last, torch.channels_last, torch.contiguous_format),
        "convnext": (torch.channels_last, torch.contiguous_format, torch.contiguous_format),
        "beit": (torch.contiguous_format,) * 3,
        "vit": (torch.contiguous_format,) * 3,
    }
    for backbone, formats in expected.items():
        config = tiny_config_factory(backbone)
        assert tuple(preferred_memory_format(config, device) for device in ("cuda", "cpu", "mps")) == formats
    # a CNN moved in that layout computes what the contiguous one does
    model = build_model(tiny_config_factory("resnet"), None).eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        reference = model(images, frequency_mask=torch.ones(2, 32, 32)).reconstruction
        model.to(memory_format=torch.channels_last)
        assert model.mfm.backbone.embedder.embedder.convolution.weight.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(model(images, frequency_mask=torch.ones(2, 32, 32)).reconstruction, reference,
                                   rtol=1e-4, atol=1e-5)


def test_bf16_residual_stream_runs_the_vit_blocks_in_bf16_under_bf16_autocast_only(tiny_config_factory):
    torch.manual_seed(0)
    model = build_model(tiny_config_factory("beit"), None, fast_paths=False).train()
    images, mask = torch.randn(4, 3, 32, 32), (torch.rand(4, 32, 32) < 0.5).float()

    def forward(autocast: bool):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            return model(images, frequency_mask=mask, output_hidden_states=True)

    reference, plain_autocast = forward(False), forward(True)
    assert {h.dtype for h in plain_autocast.hidden_states} == {torch.float32}  # autocast keeps a float32 stream
    handle = apply_fast_paths(model, mask_free_sdpa=False, patch_gemm=False, decoder_gemm=False, fused_qkv=False,
                              unit_layer_scale=False, bf16_residual_stream=True)
    assert handle.switched == {"bf16_residual_stream": 1}
    fast = forward(True)
    assert {h.dtype for h in fast.hidden_states} == {torch.bfloat16}
    assert abs(fast.loss.item() - reference.loss.item()) < 2e-2 * reference.loss.item()
    torch.testing.assert_close(forward(False).loss, reference.loss, rtol=0, atol=0)  # no autocast: untouched
    handle.remove()  # the fast paths' handle undoes it
    assert {h.dtype for h in forward(True).hidden_states} == {torch.float32}
    # pre-training's flag reaches the model through build_model, with the other fast paths and the same handle
    built = build_model(tiny_config_factory("beit"), None, bf16_residual_stream=True)
    assert {h.dtype for h in built(images, frequency_mask=mask, output_hidden_states=True).hidden_states} == {
        torch.float32}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert {h.dtype for h in built(images, frequency_mask=mask, output_hidden_states=True).hidden_states} == {
            torch.bfloat16}
    assert remove_fast_paths(built)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert {h.dtype for h in built(images, frequency_mask=mask, output_hidden_states=True).hidden_states} == {
            torch.float32}
    with pytest.raises(ValueError, match="for ViT encoders"):
        build_model(tiny_config_factory("resnet"), None, bf16_residual_stream=True)


def test_compile_mode_reaches_accelerate_and_bad_modes_are_refused(capsys):
    from modeling_mfm.training.loops.pretrain import dynamo_plugin

    args, _ = parse_arguments(["--torch_compile", "--torch_compile_mode", "reduce-overhead"])
    plugin = dynamo_plugin(args)
    assert plugin.mode == "reduce-overhead" and plugin.backend.value.lower() == "inductor"
    assert dynamo_plugin(parse_arguments(["--torch_compile_mode", "reduce-overhead"])[0]) is None  # no --torch_compile
    assert parse_arguments([])[0].torch_compile_mode == "default"
    with pytest.raises(SystemExit):
        parse_arguments(["--torch_compile_mode", "fastest"])
    assert "invalid choice" in capsys.readouterr().err


def test_cudnn_autotuning_is_on_by_default_on_cuda_only_and_restored():
    assert parse_arguments([])[0].cudnn_benchmark is True
    assert parse_arguments(["--no_cudnn_benchmark"])[0].cudnn_benchmark is False
    before = torch.backends.cudnn.benchmark
    try:
        for start in (False, True):
            torch.backends.cudnn.benchmark = start
            for enabled in (False, True):
                with cudnn_autotuning(enabled, "cuda"):  # only sets the flag: needs no GPU
                    assert torch.backends.cudnn.benchmark is enabled
                assert torch.backends.cudnn.benchmark is start
                with cudnn_autotuning(enabled, "cpu"):
                    assert torch.backends.cudnn.benchmark is start  # nothing to tune elsewhere
            with pytest.raises(KeyError), cudnn_autotuning(not start, "cuda"):
                raise KeyError("restored on errors too")
            assert torch.backends.cudnn.benchmark is start
    finally:
        torch.backends.cudnn.benchmark = before


def test_default_workers_use_the_host_cores_capped_lower_when_the_cpu_trains():
    from modeling_mfm.training.data.pretraining_data import default_num_workers

    # a 16-core host with one GPU: 15 workers (8 PIL workers could not feed the compiled ViT-B/16 step)
    assert default_num_workers(1, "cuda", cores=16) == 15
    assert default_num_workers(8, "cuda", cores=128) == 15  # 8 processes share the host's cores
    assert default_num_workers(1, "cuda", cores=256) == 32
    assert default_num_workers(1, "cpu", cores=16) == 8  # the CPU's cores also run the step
    assert default_num_workers(1, "cpu", cores=2) == 1
    assert default_num_workers(4, "cpu", cores=2) == 0  # fewer cores than processes: load in the main process
    assert default_num_workers(1, "cpu") == max(0, min(8, len(os.sched_getaffinity(0)) - 1))
