"""Does MFM pre-training pay off? The paper's comparison at CIFAR-10 scale on one GPU, one resumable stage at a time.

A ViT-Tiny (width 192, 12 layers, patch 4) at 32x32 is pre-trained with MFM (mask radius 16 / 224 of the image, as
the official 224 px runs) on the CIFAR-10 training split minus a held-out, stratified validation slice, then
fine-tuned; the same fine-tuning runs from a random initialisation; linear probe and kNN judge both encoders'
frozen features; optionally the SR, deblur and denoise pretexts get the same budgets (the paper's table). Every
figure is measured on the held-out slice, which no stage trains on.

Each stage runs one of the package's scripts (run_pretrain.py, run_finetune.py, run_linear_probe.py) in a process
of its own, with the command shown in the log and in ``study.json``; its images live on the GPU
(``--dataset_on_device``). A stage whose ``stage.json`` exists is skipped; an interrupted stage resumes from its
last checkpoint when run again. After each stage the table is rewritten (``study.json``, ``study.md``).

    python benchmarks/cifar10_study.py --train_file 'data/cifar10/*.parquet' --output_dir cifar10-study
    python benchmarks/cifar10_study.py --train_file ... --output_dir cifar10-study --stage pretrain-mfm
    python benchmarks/cifar10_study.py --train_file ... --output_dir cifar10-study --max_minutes 9   # exit 3: rerun
    python benchmarks/cifar10_study.py --train_file ... --output_dir ... --pretexts mfm sr deblur denoise
    python benchmarks/cifar10_study.py --smoke --output_dir cifar10-smoke          # the whole pipeline, on a CPU
"""

from __future__ import annotations

import dataclasses
import glob
import io
import json
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modeling_mfm.cli import RunStopped, ScriptArgumentParser, ScriptError, run_script
from modeling_mfm.configuration_mfm import CORRUPTIONS, official_mask_radius
from modeling_mfm.publishing.folder_layout import (
    CHECKPOINTS_FOLDER,
    LOGS_FOLDER,
    MODEL_CARD_FILE,
    RECONSTRUCTION_PICTURE,
    RESULTS_FILE,
)

REPO = Path(__file__).resolve().parents[1]
PRETEXTS = CORRUPTIONS  # every pretext of the package
PRETEXT_NAMES = {"mfm": "MFM", "sr": "SR", "deblur": "Deblur", "denoise": "Denoise", "scratch": "none (random init)"}
MIN_STAGE_SECONDS = 30  # with --max_minutes, no stage after the first starts with less time left
SMOKE_CLASSES, SMOKE_PER_CLASS = 10, 16
STUDY_HUB_ID = "modeling-mfm/mfm-vit-4x96-cifar10"  # the CPU plan's encoder, for release.py
HELD_OUT_PICTURE = "held_out_reconstruction.png"
MONITOR_VALUES = ("knn_top1", "gain_low_pass_db", "gain_high_pass_db")  # logged as eval/<name> by run_pretrain.py


@dataclass(frozen=True)
class Plan:
    """Model and budgets of the study: `GPU_PLAN` (one GPU) and `CPU_PLAN` (two cores); `SMOKE_PLANS` are their
    stages at a tiny size, the CI check."""

    backbone: dict[str, Any] = field(default_factory=lambda: {"patch_size": 4})  # of the mfm-vit-tiny preset
    image_size: int = 32
    mask_radius: float = official_mask_radius(32)  # 2.29 px
    validation_size: int = 5000
    # pre-training (official recipe but for the lr, scaled for a small model and data set)
    pretrain_epochs: float = 120
    pretrain_batch: int = 512
    pretrain_base_lr: float = 1.5e-3
    pretrain_warmup_epochs: float = 10
    checkpointing_steps: int = 1000
    # fine-tuning (official ViT recipe without RandAugment, which the on-device path does not have)
    finetune_epochs: int = 40
    finetune_batch: int = 512
    finetune_base_lr: float = 1e-3
    finetune_warmup_epochs: float = 5
    layer_decay: float = 0.8  # pre-trained encoders (official)
    scratch_layer_decay: float = 1.0  # a random initialisation has no lower layers worth protecting
    finetune_crop_min_scale: float = 0.08
    # linear probe on frozen features (MAE's protocol on cached features) and kNN
    probe_epochs: int = 90
    # low-label fine-tuning: a stratified choice of this many training rows (None: all of them)
    finetune_subset_size: int | None = None
    # the representation monitor of pre-training (kNN on the held-out slice; 0: off)
    monitor_steps: int = 0
    monitor_bank_size: int = 5000
    monitor_eval_size: int = 2000
    # throughput stage: optimizer steps of the real pre-training loop on each data path (0: no such stage)
    throughput_steps: int = 200
    logging_steps: int = 50
    mixed_precision_without_cuda: str = "no"
    # targets (points of top-1): fine-tuning from MFM minus from the random initialisation; the same for kNN
    target_finetune_gain: float = 3.0
    target_knn_gain: float | None = None


GPU_PLAN = Plan()
# The same comparison on a 2-core CPU in about 80 minutes (docs/cifar10_study.md): a 4-layer, width-96 ViT/4
# (0.46 M parameters, ~650 img/s in a bf16 pre-training step on 2 cores), 45 pre-training epochs, and the low-label
# setting where an initialisation matters most: fine-tuning on 10 % of the training rows.
CPU_PLAN = Plan(
    backbone={"patch_size": 4, "hidden_size": 96, "num_hidden_layers": 4, "num_attention_heads": 3,
              "intermediate_size": 384},
    pretrain_epochs=45, pretrain_batch=256, pretrain_base_lr=4e-3, pretrain_warmup_epochs=2, checkpointing_steps=500,
    finetune_subset_size=4500, finetune_epochs=50, finetune_batch=128, finetune_base_lr=2e-3,
    monitor_steps=525, throughput_steps=0, mixed_precision_without_cuda="bf16",
    target_finetune_gain=5.0, target_knn_gain=10.0,
)
_SMOKE_SIZES = dict(
    backbone={"patch_size": 4, "hidden_size": 48, "num_hidden_layers": 2, "num_attention_heads": 3,
              "intermediate_size": 192},
    validation_size=40, pretrain_epochs=4, pretrain_batch=30, pretrain_base_lr=2e-2, pretrain_warmup_epochs=1,
    checkpointing_steps=8, finetune_epochs=3, finetune_batch=30, finetune_base_lr=2e-2, finetune_warmup_epochs=1,
    probe_epochs=10, throughput_steps=6, logging_steps=2, mixed_precision_without_cuda="no",
)
SMOKE_PLANS = {
    "gpu": dataclasses.replace(GPU_PLAN, **_SMOKE_SIZES),
    "cpu": dataclasses.replace(CPU_PLAN, **{**_SMOKE_SIZES, "throughput_steps": 0}, finetune_subset_size=60,
                               monitor_steps=4, monitor_bank_size=60, monitor_eval_size=40),
}
PLANS = {"gpu": GPU_PLAN, "cpu": CPU_PLAN}

# The restoration pretexts with the released configs' settings, scaled to 32 px where the setting is a length: SR x8
# keeps frequencies below 32 / 16 = 2 cycles per image, close to MFM's low-pass radius (2.29); the deblur Gaussian's
# sigma of 5 px at 224 px is 0.71 px at 32 px. The noise level is per pixel and stays.
PRETEXT_FLAGS = {
    "mfm": [],
    "sr": ["--corruption", "sr", "--loss_on", "all", "--sr_factor", "8"],
    "deblur": ["--corruption", "deblur", "--loss_on", "all", "--blur_kernel_types", "iso", "--blur_kernel_probs", "1.0",
               "--blur_sigma_x_range", "0.714", "0.714", "--blur_sigma_y_range", "0.714", "0.714"],
    "denoise": ["--corruption", "denoise", "--loss_on", "all", "--noise_types", "gaussian", "--noise_probs", "1.0",
                "--noise_gaussian_sigma_range", "75", "75", "--noise_gaussian_gray_prob", "0"],
}


class StudyError(ScriptError):
    """A problem with the study's arguments or output folder (one line, exit code 2)."""


class TimeLimitReached(RunStopped):
    """``--max_minutes`` ran out; the stage stopped (at worst losing the work since its last checkpoint) and the
    same command continues it (exit code 3)."""


# ---------------------------------------------------------------------------------------------------- stages
def stage_names(pretexts: list[str], plan: Plan) -> list[str]:
    """All stages in run order: the main comparison first (with the pictures of the MFM encoder's
    reconstructions), then the other pretexts, then the throughput check if the plan has one."""
    names = ["pretrain-mfm", "pictures", "finetune-mfm", "init-random", "finetune-scratch", "probe-mfm",
             "probe-random"]
    for pretext in pretexts:
        if pretext != "mfm":
            names += [f"pretrain-{pretext}", f"finetune-{pretext}", f"probe-{pretext}"]
    return names + ["card"] + (["throughput"] if plan.throughput_steps else [])


class Study:
    def __init__(self, args: StudyArguments, plan: Plan) -> None:
        self.args, self.plan = args, plan
        self.root = Path(args.output_dir)
        self.cuda = _cuda_available()
        self.mixed_precision = args.mixed_precision or ("bf16" if self.cuda else plan.mixed_precision_without_cuda)
        self.deadline = time.monotonic() + 60 * args.max_minutes if args.max_minutes else None
        self.started = False  # the first stage to run always starts

    # ---- shared flags
    def data_flags(self) -> list[str]:
        return ["--train_file", self.args.train_file, "--validation_split_size", str(self.plan.validation_size),
                "--validation_split_seed", "0"]

    def test_flags(self) -> list[str]:
        """The split the final table reports, evaluated once at the end of fine-tuning and probing."""
        test = self.args.test_file
        if test is None:
            return []
        return ["--test_dir" if os.path.isdir(test) else "--test_file", test]

    def monitor_flags(self) -> list[str]:
        plan = self.plan
        if not plan.monitor_steps:
            return []
        return ["--monitor_steps", str(plan.monitor_steps), "--monitor_bank_size", str(plan.monitor_bank_size),
                "--monitor_eval_size", str(plan.monitor_eval_size)]

    def pretrain_command(self, pretext: str, output: Path, extra: list[str]) -> list[str]:
        plan = self.plan
        return [
            "run_pretrain.py", "--preset", "mfm-vit-tiny", "--image_size", str(plan.image_size),
            "--mask_radius", f"{plan.mask_radius:.4f}", "--backbone_overrides", json.dumps(plan.backbone),
            *PRETEXT_FLAGS[pretext], *self.data_flags(), "--label_column_name", "label",
            "--output_dir", str(output), "--per_device_train_batch_size", str(plan.pretrain_batch),
            "--base_learning_rate", str(plan.pretrain_base_lr), "--mixed_precision", self.mixed_precision,
            "--logging_steps", str(plan.logging_steps), "--visualization_steps", "0", "--report_to", "none",
            "--dataloader_num_workers", str(self.args.dataloader_num_workers), "--seed", str(self.args.seed),
            *self.monitor_flags(), *extra,
        ]

    def finetune_command(self, model: Path, output: Path, layer_decay: float) -> list[str]:
        plan = self.plan
        return [
            "run_finetune.py", "--model_name_or_path", str(model), *self.data_flags(), "--output_dir", str(output),
            "--dataset_on_device", "--auto_augment", "none", "--crop_pct", "1.0",
            "--crop_min_scale", str(plan.finetune_crop_min_scale), "--num_train_epochs", str(plan.finetune_epochs),
            "--per_device_train_batch_size", str(plan.finetune_batch), "--per_device_eval_batch_size", "1024",
            "--base_learning_rate", str(plan.finetune_base_lr), "--warmup_epochs", str(plan.finetune_warmup_epochs),
            "--layer_decay", str(layer_decay), "--mixed_precision", self.mixed_precision,
            "--dataloader_num_workers", str(self.args.dataloader_num_workers), "--seed", str(self.args.seed),
            "--logging_steps", str(plan.logging_steps), "--resume_from_checkpoint", "latest", "--report_to", "none",
            *(["--train_subset_size", str(plan.finetune_subset_size)] if plan.finetune_subset_size else []),
            *self.test_flags(),
        ]

    def probe_command(self, model: Path, output: Path) -> list[str]:
        return [
            "run_linear_probe.py", "--model_name_or_path", str(model), *self.data_flags(), "--crop_pct", "1.0",
            "--output_dir", str(output), "--per_device_eval_batch_size", "1024",
            "--dataloader_num_workers", str(self.args.dataloader_num_workers),
            "--num_train_epochs", str(self.plan.probe_epochs), "--seed", str(self.args.seed),
            "--mixed_precision", self.mixed_precision, *self.test_flags(),
        ]

    def encoder(self, name: str) -> Path:
        return self.root / ("init-random" if name == "random" else f"pretrain-{name}")

    # ---- running
    def run_stage(self, name: str) -> None:
        folder = self.root / name
        if (folder / "stage.json").is_file():
            print(f"[{name}] done already ({folder / 'stage.json'})", flush=True)
            return
        if self.started and self.deadline is not None and self.deadline - time.monotonic() < MIN_STAGE_SECONDS:
            raise TimeLimitReached(f"--max_minutes leaves too little time to start stage {name}")
        self.started = True
        for needed in self.requirements(name):
            if not (self.root / needed / "stage.json").is_file():
                raise StudyError(f"stage {name} needs stage {needed} first")
        resumed = (folder / CHECKPOINTS_FOLDER).is_dir() and any((folder / CHECKPOINTS_FOLDER).iterdir())
        start = time.perf_counter()
        kind, _, which = name.partition("-")
        commands: list[list[str]] = []
        if kind == "pretrain":
            epochs = ["--num_train_epochs", str(self.plan.pretrain_epochs),
                      "--warmup_epochs", str(self.plan.pretrain_warmup_epochs),
                      "--checkpointing_steps", str(self.plan.checkpointing_steps)]
            commands.append(self.pretrain_command(which, folder, ["--dataset_on_device", *epochs]))
        elif kind == "finetune":
            model = self.encoder("random" if which == "scratch" else which)
            decay = self.plan.scratch_layer_decay if which == "scratch" else self.plan.layer_decay
            commands.append(self.finetune_command(model, folder, decay))
        elif kind == "probe":
            commands.append(self.probe_command(self.encoder(which), folder))
        elif name == "init-random":
            save_random_initialisation(self.plan, folder, self.args.seed)
        elif name == "pictures":
            draw_reconstructions(self.encoder("mfm"), folder, self.args.train_file, self.plan.validation_size)
        elif name == "card":
            write_study_card(self.encoder("mfm"), self.root / "pictures", self.report()["rows"],
                             "test" if self.args.test_file else "held-out")
        elif name == "throughput":
            for path in ("device", "pil"):
                shutil.rmtree(folder / path, ignore_errors=True)  # a fresh, short run each time
                flags = ["--max_train_steps", str(self.plan.throughput_steps), "--checkpointing_steps", "0",
                         "--resume_from_checkpoint", "none"] + (["--dataset_on_device"] if path == "device" else [])
                commands.append(self.pretrain_command("mfm", folder / path, flags))
        for command in commands:
            self.execute(name, command)
        record = {"stage": name, "commands": [render_command(c) for c in commands],
                  "wall_seconds": round(time.perf_counter() - start, 1), "resumed": resumed,
                  "device": describe_device(), **self.collect(name, folder)}
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "stage.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        print(f"[{name}] finished in {record['wall_seconds']:.0f} s", flush=True)

    def requirements(self, name: str) -> list[str]:
        if name == "pictures":
            return ["pretrain-mfm"]
        if name == "card":
            return ["pictures", "finetune-mfm", "finetune-scratch", "probe-mfm", "probe-random"]
        kind, _, which = name.partition("-")
        if kind == "finetune":
            return ["init-random" if which == "scratch" else f"pretrain-{which}"]
        if kind == "probe":
            return ["init-random" if which == "random" else f"pretrain-{which}"]
        return []

    def execute(self, name: str, command: list[str]) -> None:
        print(f"[{name}] {render_command(command)}", flush=True)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(_package_root()),
                                                                       os.environ.get("PYTHONPATH")])))
        log = self.root / name / "log.txt"
        log.parent.mkdir(parents=True, exist_ok=True)
        script = [sys.executable, str(REPO / "run_scripts" / command[0]), *command[1:]]
        with open(log, "a", encoding="utf-8") as output:
            process = subprocess.Popen(script, env=env, stdout=output, stderr=subprocess.STDOUT)
            try:
                remaining = None if self.deadline is None else max(0.0, self.deadline - time.monotonic())
                returncode = process.wait(timeout=remaining)
            except subprocess.TimeoutExpired:
                message = f"--max_minutes reached in stage {name}; the same command continues it"
                raise TimeLimitReached(message) from None
            finally:  # a time limit, Ctrl-C or SIGTERM: stop the script too, never leave it running on the GPU
                if process.poll() is None:
                    process.terminate()
                    try:
                        process.wait(timeout=30)
                    except subprocess.TimeoutExpired:
                        process.kill()
                        process.wait()
        if returncode != 0:
            tail = log.read_text(encoding="utf-8", errors="replace").splitlines()[-25:]
            raise RuntimeError(f"stage {name} failed (exit {returncode}); end of {log}:\n" + "\n".join(tail))

    # ---- results
    def collect(self, name: str, folder: Path) -> dict[str, Any]:
        kind = name.partition("-")[0]
        if kind == "pretrain":
            return {"pretraining": training_speed(folder)}
        if kind == "finetune":
            results = json.loads((folder / RESULTS_FILE).read_text(encoding="utf-8"))
            final = results["history"][-1] if results["history"] else {}
            test = results.get("test", {})
            return {"finetuning": {"final_top1": final.get("top1"), "best_top1": results.get("best_top1"),
                                   "best_epoch": results.get("best_epoch"), "steps": results["global_step"],
                                   "test_final_top1": test.get("final", {}).get("top1"),
                                   "test_best_top1": test.get("best", {}).get("top1")}}
        if kind == "probe":
            results = json.loads((folder / "results.json").read_text(encoding="utf-8"))
            test = results.get("test", {})
            return {"probe": {"linear_top1": results.get("linear_probe", {}).get("top1"),
                              "knn_top1": results.get("knn", {}).get("top1"),
                              "test_linear_top1": test.get("linear_probe", {}).get("top1"),
                              "test_knn_top1": test.get("knn", {}).get("top1")}}
        if name == "pictures":
            return {"pictures": json.loads((folder / "gain.json").read_text(encoding="utf-8"))}
        if name == "card":
            return {"card": str(self.encoder("mfm") / MODEL_CARD_FILE)}
        if name == "throughput":
            return {"throughput": {path: training_speed(folder / path) for path in ("device", "pil")}}
        return {}

    def report(self) -> dict[str, Any]:
        """Writes ``study.json`` and ``study.md`` from the stages done so far; returns the JSON."""
        stages = {}
        for path in sorted(self.root.glob("*/stage.json")):
            stages[path.parent.name] = json.loads(path.read_text(encoding="utf-8"))
        rows = []
        for pretext in [*self.args.pretexts, "scratch"]:
            encoder = "random" if pretext == "scratch" else pretext
            pretraining = stages.get(f"pretrain-{pretext}", {}).get("pretraining", {})
            finetuning = stages.get(f"finetune-{pretext}", {}).get("finetuning", {})
            probe = stages.get(f"probe-{encoder}", {}).get("probe", {})
            rows.append({
                "pretext": pretext, "pretrain_epochs": 0 if pretext == "scratch" else self.plan.pretrain_epochs,
                "finetune_epochs": self.plan.finetune_epochs, "finetune_final_top1": finetuning.get("final_top1"),
                "finetune_best_top1": finetuning.get("best_top1"), "linear_top1": probe.get("linear_top1"),
                "knn_top1": probe.get("knn_top1"), "test_finetune_final_top1": finetuning.get("test_final_top1"),
                "test_finetune_best_top1": finetuning.get("test_best_top1"),
                "test_linear_top1": probe.get("test_linear_top1"), "test_knn_top1": probe.get("test_knn_top1"),
                "pretrain_img_per_s": pretraining.get("img_per_s"),
                "pretrain_peak_memory_mib": pretraining.get("peak_memory_mib"),
                "pretrain_minutes": _minutes(stages.get(f"pretrain-{pretext}")),
                "finetune_minutes": _minutes(stages.get(f"finetune-{pretext}")),
                "probe_minutes": _minutes(stages.get(f"probe-{encoder}")),
            })
        summary = {"plan": dataclasses.asdict(self.plan), "plan_name": self.args.plan, "smoke": self.args.smoke,
                   "device": describe_device(), "test_file": self.args.test_file,
                   "mixed_precision": self.mixed_precision, "rows": rows, "verdict": verdict(rows, self.plan),
                   "total_minutes": round(sum(stage["wall_seconds"] for stage in stages.values()) / 60, 2),
                   "monitor": stages.get("pretrain-mfm", {}).get("pretraining", {}).get("monitor"),
                   "pictures": stages.get("pictures", {}).get("pictures"),
                   "throughput": stages.get("throughput", {}).get("throughput"), "stages": stages}
        (self.root / "study.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        (self.root / "study.md").write_text(render_markdown(summary), encoding="utf-8")
        return summary


def _minutes(record: dict[str, Any] | None) -> float | None:
    return round(record["wall_seconds"] / 60, 2) if record else None


def verdict(rows: list[dict[str, Any]], plan: Plan) -> dict[str, Any]:
    """The plan's targets, on the test split when the study has one (else the held-out slice): fine-tuning from MFM
    beats the random initialisation by ``target_finetune_gain`` points top-1 (final epoch), kNN by
    ``target_knn_gain``; and MFM >= each other pretext."""
    by_name = {row["pretext"]: row for row in rows}
    mfm, scratch = by_name.get("mfm", {}), by_name.get("scratch", {})
    split = "test" if mfm.get("test_finetune_final_top1") is not None else "held-out"

    def value(row: dict[str, Any], key: str) -> float | None:
        return row.get(f"test_{key}") if split == "test" else row.get(key)

    result: dict[str, Any] = {"split": split}
    targets = (("finetune", "finetune_final_top1", plan.target_finetune_gain),
               ("knn", "knn_top1", plan.target_knn_gain))
    for name, key, target in targets:
        ours, theirs = value(mfm, key), value(scratch, key)
        if ours is not None and theirs is not None:
            result[f"{name}_mfm_minus_scratch"] = round(ours - theirs, 2)
            if target is not None:
                result[f"{name}_target_{target:g}_met"] = ours - theirs >= target
    others = {name: value(row, "finetune_final_top1") for name, row in by_name.items()
              if name not in ("mfm", "scratch") and value(row, "finetune_final_top1") is not None}
    if others and value(mfm, "finetune_final_top1") is not None:
        ours = value(mfm, "finetune_final_top1")
        result["mfm_minus_pretexts"] = {name: round(ours - top1, 2) for name, top1 in others.items()}
        result["mfm_at_least_each_pretext"] = all(ours >= top1 for top1 in others.values())
    return result


def render_markdown(summary: dict[str, Any]) -> str:
    def cell(value: Any, digits: int = 1) -> str:
        return "-" if value is None else (f"{value:.{digits}f}" if isinstance(value, float) else str(value))

    def pair(first: Any, second: Any) -> str:
        return f"{cell(first)} / {cell(second)}"

    plan = summary["plan"]
    test = summary.get("test_file")
    lines = [
        f"Device: {summary['device']}; mixed precision {summary['mixed_precision']}; plan {summary['plan_name']}; "
        f"{cell(summary['total_minutes'])} min of stages"
        + ("; SMOKE RUN (tiny model and data, numbers mean nothing)" if summary["smoke"] else ""),
        "",
        (f"ViT ({json.dumps(plan['backbone'])}) at {plan['image_size']} px, mask radius {plan['mask_radius']:.2f}; "
         f"top-1 (%) on the held-out slice of {plan['validation_size']} training images"
         + (f" and on the test split ({Path(test).name})" if test else "") + "; fine-tuning on "
         + (f"{plan['finetune_subset_size']} labelled training images" if plan["finetune_subset_size"]
            else "all training images outside the slice") + "."),
        "",
        ("| pre-training | pre-train epochs | fine-tune epochs | fine-tune top-1 held-out (final / best) "
         "| fine-tune top-1 test (final / best) | linear probe held-out / test | kNN held-out / test "
         "| pre-train img/s | pre-train peak MiB | pre-train min | fine-tune min | probe min |"),
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in summary["rows"]:
        lines.append(
            f"| {PRETEXT_NAMES[row['pretext']]} | {cell(row['pretrain_epochs'], 0)} | {row['finetune_epochs']} "
            f"| {pair(row['finetune_final_top1'], row['finetune_best_top1'])} "
            f"| {pair(row['test_finetune_final_top1'], row['test_finetune_best_top1'])} "
            f"| {pair(row['linear_top1'], row['test_linear_top1'])} | {pair(row['knn_top1'], row['test_knn_top1'])} "
            f"| {cell(row['pretrain_img_per_s'], 0)} | {cell(row['pretrain_peak_memory_mib'], 0)} "
            f"| {cell(row['pretrain_minutes'])} | {cell(row['finetune_minutes'])} | {cell(row['probe_minutes'])} |"
        )
    monitor = summary.get("monitor")
    if monitor:
        lines += ["", "Pre-training monitor (held-out slice): step, kNN top-1 (%), reconstruction gain low-pass / "
                  "high-pass (dB):", ""]
        lines += ["| step | kNN top-1 | gain low-pass | gain high-pass |", "| --- | --- | --- | --- |"]
        for record in monitor:
            lines.append(f"| {record['step']} | {cell(record.get('knn_top1'), 2)} "
                         f"| {cell(record.get('gain_low_pass_db'), 2)} | {cell(record.get('gain_high_pass_db'), 2)} |")
    pictures = summary.get("pictures")
    if pictures:
        lines += ["", f"Reconstruction gain of the pre-trained encoder on {pictures['images']} held-out images: "
                  f"low-pass {pictures['gain_low_pass_db']:+.2f} dB, high-pass {pictures['gain_high_pass_db']:+.2f} dB "
                  f"(picture: pictures/reconstruction.png)"]
    throughput = summary.get("throughput")
    if throughput:
        lines += ["", "End-to-end pre-training loop (the study's model and batch):", "",
                  "| data path | img/s | peak memory (MiB) |", "| --- | --- | --- |"]
        for path, label in (("device", "--dataset_on_device"), ("pil", "PIL workers")):
            speed = throughput.get(path, {})
            lines.append(f"| {label} | {cell(speed.get('img_per_s'), 0)} | {cell(speed.get('peak_memory_mib'), 0)} |")
    if summary["verdict"]:
        lines += ["", "Targets: " + json.dumps(summary["verdict"])]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------- helpers
def render_command(command: list[str]) -> str:
    return "python run_scripts/" + " ".join(shlex.quote(part) for part in command)


def training_speed(folder: Path) -> dict[str, Any]:
    """Median img/s over the logged windows after the first (start-up) one, and the peak memory, of a pre-training
    run (its ``logs/metrics.jsonl``: ``train/img_per_s``... and the monitor's ``eval/knn_top1``...), under the
    study's own names."""
    from modeling_mfm.training.run.trackers import METRICS_FILE, read_metrics

    logged = read_metrics(folder / LOGS_FOLDER / METRICS_FILE, upgrade=True)
    records = [r for r in logged if "train/img_per_s" in r]
    if not records:
        return {}
    windows = [r["train/img_per_s"] for r in records[1:]] or [records[0]["train/img_per_s"]]
    monitor = [{"step": r["step"], **{k: r[f"eval/{k}"] for k in MONITOR_VALUES if f"eval/{k}" in r}}
               for r in logged if "eval/knn_top1" in r]
    return {"img_per_s": round(statistics.median(windows), 1),
            "peak_memory_mib": round(max(r["train/peak_memory_mib"] for r in records), 1),
            "final_loss": records[-1].get("train/loss"), "first_loss": records[0].get("train/loss"),
            **({"monitor": monitor} if monitor else {})}


def save_random_initialisation(plan: Plan, folder: Path, seed: int) -> None:
    """The random initialisation the "scratch" arm fine-tunes and the probe judges: the pre-training model of the
    same configuration, as the package initialises it."""
    import torch

    from modeling_mfm import MFMForPreTraining
    from modeling_mfm.training.models.model_factory import build_config

    config = build_config("mfm-vit-tiny", overrides={"image_size": plan.image_size, "mask_radius": plan.mask_radius},
                          backbone_overrides=plan.backbone)
    torch.manual_seed(seed)
    MFMForPreTraining(config).save_pretrained(folder)


def draw_reconstructions(model_folder: Path, folder: Path, train_file: str, validation_size: int,
                         gain_images: int = 1000, shown: int = 8) -> None:
    """The pre-trained model's reconstructions of held-out images (alternating low-pass / high-pass rows, with
    spectra) in ``folder/reconstruction.png``, titled with its reconstruction gain per view measured on
    ``gain_images`` held-out images (``folder/gain.json``)."""
    from modeling_mfm import MFMForPreTraining
    from modeling_mfm.training.data.classification_data import ClassificationDataArguments
    from modeling_mfm.training.data.device_dataset import load_device_images
    from modeling_mfm.training.evaluation.representation_monitor import reconstruction_report
    from modeling_mfm.training.evaluation.visualization import save_png

    model = MFMForPreTraining.from_pretrained(model_folder).eval()
    data = ClassificationDataArguments(train_file=train_file, validation_split_size=validation_size,
                                       validation_split_seed=0).load_datasets(0)
    rows = data.validation.select(range(min(gain_images, len(data.validation))))
    images = load_device_images(rows, data.image_column, model.config.image_size, "cpu").images
    gains, picture = reconstruction_report(model, images, shown)
    save_png(picture, folder / RECONSTRUCTION_PICTURE)
    record = {"images": len(images), "gain_low_pass_db": round(gains["low_pass"], 3),
              "gain_high_pass_db": round(gains["high_pass"], 3)}
    (folder / "gain.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")


def write_study_card(model_folder: Path, pictures: Path, rows: list[dict[str, Any]], split: str) -> None:
    """Adds the study's measured accuracies to the pre-trained folder's model card (model-index, a results table)
    and its held-out reconstructions, so that ``run_scripts/release.py`` publishes them with the weights."""
    from huggingface_hub import EvalResult, ModelCard

    by_name = {row["pretext"]: row for row in rows}
    prefix = "test_" if split == "test" else ""
    dataset = {"dataset_type": "cifar10", "dataset_name": f"CIFAR-10 ({split} images)", "dataset_split": split}
    measured = (("finetune_final_top1", "top-1 after low-label fine-tuning (final epoch)"),
                ("knn_top1", "kNN top-1 of frozen features (k 20)"),
                ("linear_top1", "linear-probe top-1 of frozen features"))
    card = ModelCard.load(model_folder / MODEL_CARD_FILE)
    card.data.model_name = STUDY_HUB_ID
    card.data.eval_results = [
        EvalResult(task_type="image-classification", metric_type="accuracy", metric_name=label,
                   metric_value=round(by_name["mfm"][prefix + key], 2), **dataset)
        for key, label in measured if by_name["mfm"].get(prefix + key) is not None
    ]
    lines = ["", "## Results of the CIFAR-10 study", "",
             f"Measured by `benchmarks/cifar10_study.py` on the {split} images (top-1, %), against the random "
             "initialisation of the same model under the same recipes (docs/cifar10_study.md):", "",
             "| encoder | low-label fine-tuning (final / best epoch) | kNN | linear probe |",
             "| --- | --- | --- | --- |"]
    for name in ("mfm", "scratch"):
        row = by_name[name]
        values = [row.get(prefix + key) for key in ("finetune_final_top1", "finetune_best_top1", "knn_top1",
                                                    "linear_top1")]
        cells = ["-" if v is None else f"{v:.1f}" for v in values]
        lines.append(f"| {PRETEXT_NAMES[name]} | {cells[0]} / {cells[1]} | {cells[2]} | {cells[3]} |")
    shutil.copyfile(pictures / RECONSTRUCTION_PICTURE, model_folder / HELD_OUT_PICTURE)
    gain = json.loads((pictures / "gain.json").read_text(encoding="utf-8"))
    lines += ["", f"Reconstructions of held-out images (gain over the corrupted input on {gain['images']} of them: "
              f"low-pass {gain['gain_low_pass_db']:+.2f} dB, high-pass {gain['gain_high_pass_db']:+.2f} dB PSNR):",
              "", f"![held-out reconstructions]({HELD_OUT_PICTURE})", ""]
    body = card.text  # without the metadata, which is rebuilt from card.data (model-index included)
    marker = "\n## Results of the CIFAR-10 study\n"
    if marker in body:  # a rerun replaces the section
        body = body[: body.index(marker)]
    card.content = f"---\n{card.data.to_yaml()}\n---\n{body.rstrip()}\n" + "\n".join(lines)
    card.save(model_folder / MODEL_CARD_FILE)


def make_smoke_dataset(path: Path, seed: int = 0, per_class: int = SMOKE_PER_CLASS, sample_seed: int | None = None
                       ) -> Path:
    """A tiny CIFAR-like parquet file: ``SMOKE_CLASSES`` classes of ``per_class`` 32x32 JPEGs (a class colour, drawn
    from ``seed``, and a stripe orientation under noise drawn from ``sample_seed``: another sample seed gives a test
    split of the same classes), columns ``image`` (Image) and ``label`` (ClassLabel)."""
    import datasets
    import numpy as np
    from PIL import Image

    colours = np.random.default_rng(seed).integers(40, 216, (SMOKE_CLASSES, 3))
    rng = np.random.default_rng(seed if sample_seed is None else sample_seed)
    grid = np.mgrid[0:32, 0:32].astype(np.float32)
    images, labels = [], []
    for label in range(SMOKE_CLASSES):
        colour = colours[label]
        angle = np.pi * label / SMOKE_CLASSES
        stripes = np.sin((grid[0] * np.cos(angle) + grid[1] * np.sin(angle)) * 0.8)[..., None]
        for _ in range(per_class):
            pixels = colour + 50 * stripes + rng.normal(0, 25, (32, 32, 3))
            buffer = io.BytesIO()
            Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buffer, format="JPEG", quality=90)
            images.append({"bytes": buffer.getvalue(), "path": None})
            labels.append(label)
    features = datasets.Features({"image": datasets.Image(),
                                  "label": datasets.ClassLabel(names=[f"class{i}" for i in range(SMOKE_CLASSES)])})
    path.parent.mkdir(parents=True, exist_ok=True)
    datasets.Dataset.from_dict({"image": images, "label": labels}, features=features).to_parquet(str(path))
    return path


def describe_device() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU ({len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()} cores)"


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _package_root() -> Path:
    import modeling_mfm

    return Path(modeling_mfm.__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------------- command line
@dataclass
class StudyArguments:
    output_dir: str = field(metadata={"help": "One folder per stage, study.json and study.md."})
    train_file: str | None = field(
        default=None, metadata={"help": "CIFAR-10's training split: parquet file(s), a quoted glob pattern."}
    )
    test_file: str | None = field(
        default=None,
        metadata={"help": "The split the final table reports, evaluated once at the end of fine-tuning and probing: "
                          "data file(s) like --train_file, or an image folder <dir>/<class>/*."},
    )
    plan: str = field(
        default="gpu", metadata={"help": "The budgets: 'gpu' (ViT-Tiny, one GPU) or 'cpu' (a 4-layer ViT, 2 cores, "
                                         "low-label fine-tuning).", "choices": tuple(PLANS)},
    )
    stage: str = field(default="all", metadata={"help": "One stage (see --list_stages), 'report', or 'all'."})
    pretexts: list[str] = field(
        default_factory=lambda: ["mfm"],
        metadata={"help": "Pre-training pretexts to compare (mfm always runs); add sr deblur denoise for the paper's "
                          "table.", "choices": PRETEXTS},
    )
    smoke: bool = field(
        default=False, metadata={"help": "The whole pipeline on a tiny generated data set and model (CPU)."}
    )
    mixed_precision: str | None = field(
        default=None, metadata={"help": "Default: bf16 on CUDA, else no.", "choices": ("no", "fp16", "bf16")}
    )
    dataloader_num_workers: int | None = field(
        default=None,
        metadata={"help": "Decoding / evaluation workers per stage (default: the cores but one, at most 15)."},
    )
    seed: int = field(default=0, metadata={"help": "Seed of every stage and of the held-out slice."})
    pretrain_epochs: float | None = field(default=None, metadata={"help": "Override the plan's pre-training epochs."})
    finetune_epochs: int | None = field(default=None, metadata={"help": "Override the plan's fine-tuning epochs."})
    mask_radius: float | None = field(
        default=None, metadata={"help": "Override the plan's mask radius (default 16 / 224 x 32)."}
    )
    max_minutes: float | None = field(
        default=None,
        metadata={"help": "Stop (exit code 3) after this many minutes, stopping the running stage; the same command "
                          "continues from the stage's last checkpoint."},
    )
    list_stages: bool = field(default=False, metadata={"help": "Print the stages in run order and exit."})

    def __post_init__(self) -> None:
        self.pretexts = list(dict.fromkeys(["mfm", *self.pretexts]))
        if self.dataloader_num_workers is None:
            cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
            self.dataloader_num_workers = 0 if self.smoke else max(0, min(15, cores - 1))


def parse_args(argv: Sequence[str] | None = None) -> StudyArguments:
    parser = ScriptArgumentParser(StudyArguments, prog="cifar10_study.py", description=__doc__.split("\n\n")[0])
    (args,) = parser.parse_args_into_dataclasses(argv)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)  # unwind, so that the running stage's script is stopped too
    plan = SMOKE_PLANS[args.plan] if args.smoke else PLANS[args.plan]
    names = stage_names(args.pretexts, plan)
    if args.list_stages:
        print("\n".join(names + ["report"]))
        return 0
    changes = {name: getattr(args, name) for name in ("pretrain_epochs", "finetune_epochs", "mask_radius")
               if getattr(args, name) is not None}
    plan = dataclasses.replace(plan, **changes)
    root = Path(args.output_dir)
    if args.smoke and args.train_file is None:
        args.train_file = str(root / "smoke-data" / "train.parquet")
        if not Path(args.train_file).is_file():
            make_smoke_dataset(Path(args.train_file), seed=args.seed)
        if args.plan == "cpu" and args.test_file is None:
            args.test_file = str(root / "smoke-data" / "test.parquet")
            if not Path(args.test_file).is_file():
                make_smoke_dataset(Path(args.test_file), seed=args.seed, per_class=4, sample_seed=args.seed + 1)
    if args.train_file is None:
        raise StudyError("--train_file is required (or --smoke)")
    if args.stage not in (*names, "all", "report"):
        raise StudyError(f"unknown stage {args.stage!r}; stages: {', '.join(names)}, report, all")
    if args.test_file is not None and not os.path.exists(args.test_file) and not glob.glob(args.test_file):
        raise StudyError(f"--test_file {args.test_file!r} names no file or folder")
    check_plan(root, {"plan": dataclasses.asdict(plan), "train_file": args.train_file, "seed": args.seed,
                      "test_file": args.test_file})
    study = Study(args, plan)
    for name in names if args.stage == "all" else ([args.stage] if args.stage != "report" else []):
        study.run_stage(name)
        study.report()
    summary = study.report()
    print((root / "study.md").read_text(encoding="utf-8"))
    if summary["verdict"]:
        print("targets:", json.dumps(summary["verdict"]))
    return 0


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def check_plan(root: Path, plan: dict[str, Any]) -> None:
    """An output folder holds one study: the plan is written at the first run and must match afterwards."""
    path = root / "plan.json"
    if path.is_file():
        saved = json.loads(path.read_text(encoding="utf-8"))
        if saved != json.loads(json.dumps(plan)):
            changed = sorted(k for k in set(saved["plan"]) | set(plan["plan"])
                             if saved["plan"].get(k) != plan["plan"].get(k))
            changed += [k for k in ("train_file", "seed", "test_file") if saved.get(k) != plan.get(k)]
            raise StudyError(f"{root} holds a study with another plan (differs in {', '.join(changed)}); "
                             "use another --output_dir")
        return
    root.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(plan, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    sys.exit(run_script(main))
