"""The command-line shape every script shares: transformers' ``HfArgumentParser`` over argument dataclasses, and one
exit-code convention.

Exit codes: 0 done; 2 refused to start (a bad flag or value, missing data, a folder in use, changed settings, an
unsafe checkpoint: a `ScriptError`); 3 stopped before the end (a non-finite loss, a failed write, a time limit: a
`RunStopped`). Either is printed as one line on stderr, ``<script>: error: ...`` or ``<script>: stopped: ...``;
anything else is a bug and keeps its traceback. The library's own exceptions derive from these two classes, so a
script only calls its entry function inside `run_script`.

One vocabulary: a concept has one flag name in every script, transformers' where it has one. Flags renamed to get
there are listed in `RENAMED_FLAGS`; their old names keep working for one release, rewritten to the new ones before
parsing, with a `FutureWarning`.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from transformers import HfArgumentParser

__all__ = [
    "EXIT_REFUSED",
    "EXIT_STOPPED",
    "RENAMED_FLAGS",
    "RunStopped",
    "ScriptArgumentParser",
    "ScriptError",
    "run_script",
]

EXIT_REFUSED = 2
EXIT_STOPPED = 3

# Flags renamed in 0.2.0, accepted under their old names (with a FutureWarning) until 0.3.0: for each argument
# dataclass that had them (by class name, so that this module imports no training code), old name -> new name.
RENAMED_FLAGS: dict[str, dict[str, str]] = {
    "PretrainingArguments": {"model": "preset"},
    "FinetuneArguments": {"clip_grad": "max_grad_norm"},
    "LinearProbeArguments": {
        "linear_batch_size": "per_device_train_batch_size",
        "linear_epochs": "num_train_epochs",
        "linear_base_lr": "base_learning_rate",
        "linear_weight_decay": "weight_decay",
        "linear_warmup_epochs": "warmup_epochs",
    },
    "BenchmarkArguments": {"models": "presets", "compile_mode": "torch_compile_mode"},
}


class ScriptError(ValueError):
    """The run cannot start for a reason the user can fix (exit code 2)."""


class RunStopped(Exception):
    """The run started and stopped before its end; what it saved stays usable (exit code 3)."""


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults in the help, the description's line breaks kept (its usage examples)."""


_PERCENT = re.compile(r"%%|%\(\w+\)|%")


def _escape_percent(text: str) -> str:
    """A help text with every bare "%" doubled, since argparse %-formats help texts; ``%%`` and ``%(name)s`` stay."""
    return _PERCENT.sub(lambda match: "%%" if match.group() == "%" else match.group(), text)


class ScriptArgumentParser(HfArgumentParser):
    """``HfArgumentParser`` whose every refusal is one line, ``<prog>: error: <message>``, and exit code 2: an unknown
    flag, a value of the wrong type, or a value the dataclass refuses (a ValueError from its ``__post_init__`` or
    from its ``check()`` method, for checks that need the other values). ``--help`` keeps any "%" in a help text.
    The old names of its dataclasses' renamed flags (`RENAMED_FLAGS`) still parse, with a FutureWarning."""

    def __init__(self, dataclass_types: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(dataclass_types, **kwargs)
        self.renamed_flags = self._own_renamed_flags()
        for old, new in self.renamed_flags.items():
            action = self._option_string_actions[f"--{new}"]
            if action.help and action.help != argparse.SUPPRESS:
                action.help += f" (Formerly --{old}.)"
        for action in self._actions:
            if action.help and action.help != argparse.SUPPRESS:
                action.help = _escape_percent(action.help)

    def _own_renamed_flags(self) -> dict[str, str]:
        """The `RENAMED_FLAGS` of this parser's dataclasses (and their bases) whose new name is one of its flags."""
        renamed = {}
        for dtype in self.dataclass_types:
            for cls in getattr(dtype, "__mro__", ()):
                renamed.update(RENAMED_FLAGS.get(cls.__name__, {}))
        return {old: new for old, new in renamed.items()
                if f"--{new}" in self._option_string_actions and f"--{old}" not in self._option_string_actions}

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: Any = None
    ) -> Any:
        """argparse's, after the old names of renamed flags are replaced by the new ones (every parse goes here)."""
        args = list(sys.argv[1:] if args is None else args)
        return super().parse_known_args(self._with_current_names(args), namespace)

    def _with_current_names(self, args: list[str]) -> list[str]:
        """``args`` with ``--old`` / ``--old=value`` (or ``--old-name``) written ``--new``; one FutureWarning per old
        name used; giving both names of one flag is refused."""
        if not self.renamed_flags:
            return args
        given = {_flag_name(arg) for arg in args}
        rewritten, used = [], {}
        for index, arg in enumerate(args):
            if arg == "--":  # what follows is not an option
                rewritten += args[index:]
                break
            old = _flag_name(arg)
            if old in self.renamed_flags:
                new = used[old] = self.renamed_flags[old]
                if new in given:
                    self.error(f"--{old} is the old name of --{new}: give --{new} only")
                _, equals, value = arg.partition("=")
                arg = f"--{new}{equals}{value}"
            rewritten.append(arg)
        for old, new in used.items():
            warnings.warn(f"--{old} is deprecated and will be removed in 0.3.0: use --{new}", FutureWarning,
                          stacklevel=2)
        return rewritten

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_REFUSED, f"{self.prog}: error: {_one_line(message)}\n")

    def parse_args_into_dataclasses(self, args: Sequence[str] | None = None) -> tuple[Any, ...]:  # type: ignore[override]
        """The command line (``sys.argv[1:]`` when ``args`` is None) as one instance per dataclass, checked. Unlike
        ``HfArgumentParser`` it reads no ``.args`` file and refuses unknown flags before building any dataclass."""
        namespace = self.parse_args(args)
        try:
            parsed = self.parse_dict(vars(namespace))
            for arguments in parsed:
                check = getattr(arguments, "check", None)
                if callable(check):
                    check()
        except (ValueError, TypeError) as error:
            self.error(str(error))
        return parsed


def run_script(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None) -> int:
    """Runs a script's ``main(argv)`` and returns its exit code: ``main``'s (0 when it returns None), 2 for a
    `ScriptError`, 3 for `RunStopped`, each printed as one line on stderr under the script's file name."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    code = getattr(main, "__code__", None)
    prog = Path(code.co_filename).name if code is not None else Path(sys.argv[0] or "script").name
    try:
        result = main(argv)
    except ScriptError as error:
        _say(f"{prog}: error: {_one_line(error)}")
        return EXIT_REFUSED
    except RunStopped as error:
        _say(f"{prog}: stopped: {_one_line(error)}")
        return EXIT_STOPPED
    return 0 if result is None else int(result)


def _say(line: str) -> None:
    # one write with its newline: the processes of a launch share stderr, and print's two writes interleave there
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def _flag_name(arg: str) -> str | None:
    """``"--max-grad-norm=1"`` -> ``"max_grad_norm"``; None for anything that is not a long option."""
    if not arg.startswith("--") or arg == "--":
        return None
    return arg[2:].partition("=")[0].replace("-", "_")


def _one_line(message: object) -> str:
    return " ".join(str(message).splitlines()) or type(message).__name__
