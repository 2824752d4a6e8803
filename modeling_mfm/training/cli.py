"""The command-line shape every script shares: transformers' ``HfArgumentParser`` over argument dataclasses, and
errors as one line on stderr with exit code 2, whether a flag is unknown, malformed, refused by a dataclass check,
or the run cannot start (missing data, a folder in use...)."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from transformers import HfArgumentParser

__all__ = ["ScriptArgumentParser", "ScriptError", "run_script"]


class ScriptError(ValueError):
    """The run cannot start or continue for a reason the user can fix; the script prints it as one line (exit 2)."""


class ScriptArgumentParser(HfArgumentParser):
    """``HfArgumentParser`` whose every error is one line, ``<prog>: error: <message>``, and exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")

    def parse_args_into_dataclasses(self, args: Sequence[str] | None = None, **kwargs: Any) -> tuple[Any, ...]:
        kwargs.pop("return_remaining_strings", None)
        try:
            *parsed, remaining = super().parse_args_into_dataclasses(
                args=args, return_remaining_strings=True, **kwargs
            )
        except (ValueError, TypeError) as error:  # a dataclass check refusing a value
            self.error(str(error))
        if remaining:
            self.error(f"unrecognized arguments: {' '.join(remaining)}")
        return tuple(parsed)


def run_script(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None) -> int:
    """Runs a script's ``main(argv)``: a `ScriptError` becomes one line on stderr and exit code 2; the exit code is
    ``main``'s (0 when it returns None)."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    prog = sys.argv[0].rsplit("/", 1)[-1] if sys.argv and sys.argv[0] else "script"
    try:
        code = main(argv)
    except ScriptError as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return 2
    return 0 if code is None else int(code)
