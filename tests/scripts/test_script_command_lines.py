"""Every script has the same command line: ``--help`` lists every flag, and an unknown flag or a malformed value is
one line on stderr with exit code 2. The scripts are found, not listed: a new file in run_scripts/ or benchmarks/
is covered as soon as it exists (and must be a script on the shared helper, or a module its siblings import)."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import re
import shlex
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import REPO, load_script

from modeling_mfm.cli import RunStopped, ScriptArgumentParser, ScriptError, run_script
from modeling_mfm.training.run.disk_faults import WriteFailedError
from modeling_mfm.training.run.run_folder import RunFolderError

SCRIPT_FOLDERS = ("run_scripts", "benchmarks")
MAIN_GUARD = 'if __name__ == "__main__":'


def python_files() -> list[Path]:
    return sorted(path for folder in SCRIPT_FOLDERS for path in (REPO / folder).glob("*.py"))


def scripts() -> list[str]:
    return [str(path.relative_to(REPO)) for path in python_files() if MAIN_GUARD in path.read_text(encoding="utf-8")]


def run(script: str, argv: list[str]) -> tuple[int, str, str]:
    """``script``'s main(argv) as its command line runs it, in this process -> (exit code, stdout, stderr)."""
    main = load_script(script).main
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = run_script(main, argv)
        except SystemExit as stop:  # the parser: --help, or a refused flag
            code = stop.code
    return code, out.getvalue(), err.getvalue()


@functools.cache
def script_help(script: str) -> tuple[int, str, str, tuple[ScriptArgumentParser, ...]]:
    """``--help`` of a script, with the parsers it built."""
    parsers = []
    original = ScriptArgumentParser.__init__

    def record(self, *args, **kwargs):
        original(self, *args, **kwargs)
        parsers.append(self)

    ScriptArgumentParser.__init__ = record
    try:
        code, out, err = run(script, ["--help"])
    finally:
        ScriptArgumentParser.__init__ = original
    return code, out, err, tuple(parsers)


def flag_fields(script: str) -> list[tuple[dataclasses.Field, type]]:
    """The (field, type) of every flag of the script's argument dataclasses."""
    *_, parsers = script_help(script)
    assert parsers, f"{script} does not parse its command line with ScriptArgumentParser"
    fields = []
    for parser in parsers:
        for dtype in parser.dataclass_types:
            hints = typing.get_type_hints(dtype)
            fields += [(f, hints[f.name]) for f in dataclasses.fields(dtype) if f.init]
    return fields


def base_type(annotation: type) -> type:
    """``int | None`` -> int, ``list[float]`` -> float, ``Literal[...]`` -> the Literal."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType, list):
        return base_type(args[0])
    return annotation


def is_required(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def error_line(err: str, prog: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"{prog}: error: "), err
    return lines[0]


def test_every_script_is_found_and_every_other_file_is_a_module_the_scripts_import():
    found = scripts()
    assert {"run_scripts/run_pretrain.py", "run_scripts/convert_original.py", "benchmarks/benchmark.py",
            "benchmarks/cifar10_study.py", "benchmarks/sdpa_compile_probe.py"} <= set(found)
    sources = {path: path.read_text(encoding="utf-8") for path in python_files()}
    for path, source in sources.items():
        if MAIN_GUARD in source:
            assert re.search(r"^def main\(argv", source, re.MULTILINE), f"{path.name}: no main(argv)"
            assert "sys.exit(run_script(main))" in source, f"{path.name}: does not run main through run_script"
        else:  # a helper module: some sibling imports it
            importers = [other.name for other, text in sources.items()
                         if other.parent == path.parent
                         and re.search(rf"^(from|import) {path.stem}\b", text, re.MULTILINE)]
            assert importers, f"{path.relative_to(REPO)} is neither a script (no __main__ guard) nor imported"


@pytest.mark.parametrize("script", scripts())
def test_help_lists_every_flag(script):
    code, out, err, parsers = script_help(script)
    assert code == 0, err
    assert out.startswith(f"usage: {parsers[0].prog} ")
    for f, _ in flag_fields(script):
        if f.metadata.get("help") != "==SUPPRESS==":
            assert f"--{f.name}" in out, f"--{f.name} missing from {script} --help"


@pytest.mark.parametrize("script", scripts())
def test_an_unknown_flag_is_one_line_and_exit_code_2(script):
    required = []
    for f, annotation in flag_fields(script):
        if is_required(f):
            required += [f"--{f.name}", "1" if base_type(annotation) in (int, float) else "x"]
    code, _, err = run(script, [*required, "--no_such_flag", "1"])
    assert code == 2
    assert "unrecognized arguments: --no_such_flag 1" in error_line(err, script_help(script)[3][0].prog)


@pytest.mark.parametrize("script", scripts())
def test_a_malformed_value_is_one_line_and_exit_code_2(script):
    def malformed(annotation: type) -> str | None:  # a number, else a yes/no, else a choice
        kind = base_type(annotation)
        return {int: "not-a-number", float: "not-a-number", bool: "maybe"}.get(kind) or (
            "not-a-choice" if typing.get_origin(kind) is typing.Literal else None)

    fields = sorted(flag_fields(script), key=lambda item: ["not-a-number", "maybe", "not-a-choice", None].index(
        malformed(item[1])))
    name, value = fields[0][0].name, malformed(fields[0][1])
    code, _, err = run(script, [f"--{name}", value])
    assert code == 2
    line = error_line(err, script_help(script)[3][0].prog)
    assert f"argument --{name}" in line and value in line, line


def shell_commands(name: str) -> list[list[str]]:
    """The commands of ``benchmarks/<name>`` that run a Python script, as words (continuations joined, redirections
    dropped): ``step`` lines expanded with the script's ``bench`` prefix."""
    lines = (REPO / "benchmarks" / name).read_text(encoding="utf-8").replace("\\\n", " ").splitlines()
    commands, bench = [], None
    for line in (line.strip() for line in lines):
        if not re.match(r"(bench=|step |.*python benchmarks/)", line):
            continue
        words = shlex.split(re.split(r" [0-9]?>", line)[0], comments=True)
        if words[0].startswith("bench="):
            bench = shlex.split(words[0].partition("=")[2])
        elif words[0] == "step":
            arguments = words[2:]
            commands.append([*bench, *(arguments[1:] if arguments[0].isdigit() else arguments), "--json", "x"])
        elif "python" in words and words[words.index("python") + 1].startswith("benchmarks/"):
            commands.append(words[words.index("python"):])
    return commands


@pytest.mark.parametrize("name", ["gpu.sh", "cpu.sh"])
def test_the_benchmark_shell_scripts_pass_flags_their_scripts_accept(name):
    commands = shell_commands(name)
    assert len(commands) >= 6
    for command in commands:
        script = command[1]
        parsers = script_help(script)[3]
        parsers[0].parse_args_into_dataclasses(command[2:])  # exits (code 2) on a flag the script does not accept


# ---------------------------------------------------------------------------------------------------- one vocabulary
FINETUNE = ["--preset", "mfm-vit-tiny", "--train_dir", "x"]
PROBE = ["--model_name_or_path", "m", "--train_dir", "x"]


def parse_with(script: str, argv: list[str]) -> tuple:
    """``argv`` parsed by the (first) parser of ``script``, as its main() would."""
    return script_help(script)[3][0].parse_args_into_dataclasses(argv)


@pytest.mark.parametrize(("script", "argv", "old", "new", "value"), [
    ("run_scripts/run_finetune.py", [*FINETUNE, "--clip_grad", "1.5"], "clip_grad", "max_grad_norm", 1.5),
    ("run_scripts/run_finetune.py", [*FINETUNE, "--clip-grad=2"], "clip_grad", "max_grad_norm", 2.0),
    ("run_scripts/run_pretrain.py", ["--model", "mfm-vit-small"], "model", "preset", "mfm-vit-small"),
    ("run_scripts/run_linear_probe.py", [*PROBE, "--linear_batch_size", "8"], "linear_batch_size",
     "per_device_train_batch_size", 8),
    ("run_scripts/run_linear_probe.py", [*PROBE, "--linear_epochs", "5"], "linear_epochs", "num_train_epochs", 5),
    ("run_scripts/run_linear_probe.py", [*PROBE, "--linear_base_lr=0.2"], "linear_base_lr", "base_learning_rate",
     0.2),
    ("run_scripts/run_linear_probe.py", [*PROBE, "--linear_weight_decay", "0.01"], "linear_weight_decay",
     "weight_decay", 0.01),
    ("run_scripts/run_linear_probe.py", [*PROBE, "--linear_warmup_epochs", "2"], "linear_warmup_epochs",
     "warmup_epochs", 2),
    ("benchmarks/benchmark.py", ["--models", "mfm-vit-tiny"], "models", "presets", ["mfm-vit-tiny"]),
    ("benchmarks/benchmark.py", ["--compile_mode", "reduce-overhead"], "compile_mode", "torch_compile_mode",
     "reduce-overhead"),
])
def test_a_renamed_flag_still_works_under_its_old_name_with_one_warning(script, argv, old, new, value):
    with pytest.warns(FutureWarning) as warned:
        parsed = parse_with(script, argv)
    assert getattr(parsed[0], new) == value
    messages = [str(w.message) for w in warned if issubclass(w.category, FutureWarning)]
    assert messages == [f"--{old} is deprecated and will be removed in 0.3.0: use --{new}"]
    assert f"(Formerly --{old}.)" in script_help(script)[3][0]._option_string_actions[f"--{new}"].help  # --help


def test_an_old_flag_name_used_twice_warns_once_and_the_last_value_wins():
    with pytest.warns(FutureWarning) as warned:
        (parsed,) = parse_with("run_scripts/run_linear_probe.py", [*PROBE, "--linear_epochs", "1",
                                                                   "--linear_epochs", "3"])
    assert parsed.num_train_epochs == 3
    assert len([w for w in warned if issubclass(w.category, FutureWarning)]) == 1


def test_a_flag_given_under_its_old_and_new_names_is_refused(capsys):
    with pytest.raises(SystemExit) as stop:
        parse_with("run_scripts/run_finetune.py", [*FINETUNE, "--clip_grad", "1", "--max_grad_norm", "2"])
    assert stop.value.code == 2
    assert error_line(capsys.readouterr().err, "run_finetune.py").endswith(
        "--clip_grad is the old name of --max_grad_norm: give --max_grad_norm only")


@pytest.mark.parametrize(("script", "argv"), [
    ("run_scripts/run_pretrain.py", ["--clip_grad", "1"]),  # fine-tuning's old name only
    ("run_scripts/run_finetune.py", [*FINETUNE, "--linear_epochs", "3"]),  # the linear probe's old name only
])
def test_an_old_flag_name_belongs_to_the_script_that_had_it(script, argv, capsys):
    with pytest.raises(SystemExit) as stop:
        parse_with(script, argv)
    assert stop.value.code == 2
    assert f"unrecognized arguments: {' '.join(argv[-2:])}" in capsys.readouterr().err


def test_the_shared_flag_names_parse_in_every_training_script():
    (finetuning,) = parse_with("run_scripts/run_finetune.py", [*FINETUNE, "--max_grad_norm", "0", "--adam_epsilon",
                                                               "1e-6", "--config_overrides", '{"image_size": 32}'])
    assert (finetuning.max_grad_norm, finetuning.adam_epsilon, finetuning.config_overrides) == (
        0.0, 1e-6, '{"image_size": 32}')
    pretraining, _ = parse_with("run_scripts/run_pretrain.py", [
        "--preset", "mfm-vit-tiny", "--max_grad_norm", "0", "--adam_epsilon", "1e-6", "--config_overrides",
        '{"image_size": 32}'])
    assert (pretraining.preset, pretraining.max_grad_norm, pretraining.adam_epsilon, pretraining.config_overrides) == (
        "mfm-vit-tiny", 0.0, 1e-6, '{"image_size": 32}')
    (segmentation,) = parse_with("run_scripts/run_segmentation.py", [
        "--model_name_or_path", "m", "--data_dir", "d", "--max_grad_norm", "1", "--adam_epsilon", "1e-6",
        "--adam_beta1", "0.8", "--adam_beta2", "0.98"])
    assert (segmentation.max_grad_norm, segmentation.adam_epsilon, segmentation.adam_beta1,
            segmentation.adam_beta2) == (1.0, 1e-6, 0.8, 0.98)
    (default,) = parse_with("run_scripts/run_segmentation.py", ["--model_name_or_path", "m", "--data_dir", "d"])
    assert (default.max_grad_norm, default.adam_epsilon, default.adam_beta1, default.adam_beta2) == (
        0.0, 1e-8, 0.9, 0.999)  # what segmentation always used
    (probe,) = parse_with("run_scripts/run_linear_probe.py", [
        *PROBE, "--per_device_train_batch_size", "64", "--num_train_epochs", "0", "--base_learning_rate", "0.05",
        "--weight_decay", "0.001", "--warmup_epochs", "1"])
    assert (probe.per_device_train_batch_size, probe.num_train_epochs, probe.base_learning_rate, probe.weight_decay,
            probe.warmup_epochs) == (64, 0, 0.05, 0.001, 1)


# ---------------------------------------------------------------------------------------------------- the helper
@dataclass
class Example:
    size: int = field(default=1, metadata={"help": "Grows by 10 % per step; default %(default)s; 100%% sure."})
    low: float = field(default=0.0, metadata={"help": "Lower bound."})
    high: float = field(default=1.0, metadata={"help": "Upper bound."})

    def __post_init__(self) -> None:
        if self.size < 1:
            raise ValueError(f"size must be >= 1, got {self.size}")

    def check(self) -> None:
        if self.low >= self.high:
            raise ValueError(f"low must be below high, got\n{self.low} >= {self.high}")


def test_the_parser_refuses_in_one_line_and_keeps_percent_signs_in_the_help(capsys):
    parser = ScriptArgumentParser(Example, prog="example.py")
    assert parser.parse_args_into_dataclasses(["--size", "3"]) == (Example(size=3),)
    assert "Grows by 10 % per step; default 1; 100% sure." in " ".join(parser.format_help().split())
    for argv, message in ((["--size", "0"], "size must be >= 1, got 0"),            # __post_init__
                          (["--low", "2"], "low must be below high, got 2.0 >= 1.0"),  # check(), one line
                          (["--size", "big"], "argument --size: invalid int value: 'big'"),
                          (["--sizes", "3"], "unrecognized arguments: --sizes 3")):
        with pytest.raises(SystemExit) as stop:
            parser.parse_args_into_dataclasses(argv)
        assert stop.value.code == 2
        assert capsys.readouterr().err == f"example.py: error: {message}\n"


@pytest.mark.parametrize(("raised", "code", "line"), [
    (None, 0, None),
    (ScriptError("bad input"), 2, "error: bad input"),
    (RunFolderError("folder in use"), 2, "error: folder in use"),
    (RunStopped("the loss is NaN"), 3, "stopped: the loss is NaN"),
    (WriteFailedError("no space left on device:\nx"), 3, "stopped: no space left on device: x"),
])
def test_run_script_maps_the_exceptions_to_exit_codes(raised, code, line, capsys):
    def main(argv):
        assert argv == ["--flag"]
        if raised is not None:
            raise raised

    assert run_script(main, ["--flag"]) == code
    err = capsys.readouterr().err
    assert err == ("" if line is None else f"{Path(__file__).name}: {line}\n")
    assert run_script(lambda argv: 5) == 5  # main's own code


def test_other_exceptions_keep_their_traceback():
    def main(argv):
        raise KeyError("a bug")

    with pytest.raises(KeyError):
        run_script(main, [])
