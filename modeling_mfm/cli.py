"""The command-line shape every script shares: transformers' ``HfArgumentParser`` over argument dataclasses, and one
exit-code convention.

Exit codes: 0 done; 2 refused to start (a bad flag or value, missing data, a folder in use, changed settings, an
unsafe checkpoint: a `ScriptError`); 3 stopped before the end (a non-finite loss, a failed write, a time limit: a
`RunStopped`). Either is printed as one line on stderr, ``<script>: error: ...`` or ``<script>: stopped: ...``;
anything else is a bug and keeps its traceback. The library's own exceptions derive from these two classes, so a
script only calls its entry function inside `run_script`.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from transformers import HfArgumentParser

__all__ = ["EXIT_REFUSED", "EXIT_STOPPED", "RunStopped", "ScriptArgumentParser", "ScriptError", "run_script"]

EXIT_REFUSED = 2
EXIT_STOPPED = 3


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
    from its ``check()`` method, for checks that need the other values). ``--help`` keeps any "%" in a help text."""

    def __init__(self, dataclass_types: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(dataclass_types, **kwargs)
        for action in self._actions:
            if action.help and action.help != argparse.SUPPRESS:
                action.help = _escape_percent(action.help)

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


def _one_line(message: object) -> str:
    return " ".join(str(message).splitlines()) or type(message).__name__
