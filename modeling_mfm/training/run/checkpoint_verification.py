"""Every file of a training checkpoint is checked with readers that execute nothing, before Accelerate loads it.

People resume from checkpoint folders they downloaded or share on clusters, so a checkpoint is untrusted input.
`verify_checkpoint` reads each file the way it is meant to be read and refuses the folder, naming the file, when
one fails:

* ``*.safetensors``: ``safetensors.safe_open`` (a header and raw tensors; nothing to execute);
* ``*.json`` (``trainer_state.json``, our step, counters and settings): ``json.load``;
* ``*.bin``, ``*.pt``, ``*.pkl`` (optimizer, grad scaler, sampler and RNG states written by ``Accelerator.save_state``):
  ``torch.load(weights_only=True)`` allowing only the numpy globals Accelerate itself allows for them, memory-mapped
  so that large optimizer states are not read twice;
* the RNG files are also applied to throwaway generators: Accelerate skips an RNG file it cannot use with a message
  at INFO level, which would silently change the run;
* anything else (another extension, a sub-folder such as a sharded FSDP state) cannot be checked and is refused.

Accelerate then reads the same files with ``weights_only=True`` (we register nothing with
``register_for_checkpointing``, whose ``custom_checkpoint_*.pkl`` files Accelerate reads with ``weights_only=False``).
"""

from __future__ import annotations

import json
import os
import pickle
import random
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate.utils.other import TORCH_SAFE_GLOBALS
from safetensors import safe_open

from ...cli import ScriptError
from .checkpointing import TRAINER_STATE_NAME

__all__ = ["RNG_STATE_PREFIX", "CheckpointVerificationError", "verify_checkpoint"]

RNG_STATE_PREFIX = "random_states_"
TORCH_SUFFIXES = (".bin", ".pt", ".pth", ".pkl")


class CheckpointVerificationError(ScriptError):
    """A file of a checkpoint folder is unsafe, unreadable or missing; the message names it, on one line (exit
    code 2)."""


def _one_line(error: BaseException) -> str:
    """The specific part of an error message on one line (torch's weights-only refusals add a generic preamble
    that suggests ``weights_only=False``, exactly what must not be done with an untrusted file)."""
    generic = ("Weights only load failed", "Please file an issue", "Check the documentation", "In PyTorch 2.6",
               "(1) ", "(2) ", "Re-running", "WeightsUnpickler error:")
    lines = [line.strip() for line in str(error).replace("WeightsUnpickler error:", "\n").splitlines()]
    specific = [line for line in lines if line and not line.startswith(generic)]
    return " ".join(specific) or type(error).__name__


def _read_torch_file(path: Path) -> Any:
    if not zipfile.is_zipfile(path):
        raise CheckpointVerificationError(
            f"refusing to resume: {path} is not a file written by torch.save (a zip archive); it may hold a bare "
            "pickle, which is never loaded"
        )
    try:
        with torch.serialization.safe_globals(TORCH_SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as error:
        raise CheckpointVerificationError(
            f"refusing to resume: {path} holds pickled objects other than tensors and plain data "
            f"({_one_line(error)}); nothing from it was executed"
        ) from error
    except Exception as error:  # truncated zip, bad record, ...
        raise CheckpointVerificationError(
            f"{path} is unreadable (truncated or corrupt?): {_one_line(error)}"
        ) from error


def _check_rng_states(path: Path, states: Any) -> None:
    """Applies the states to new generators (never to the program's own): what Accelerate would silently skip."""
    try:
        if not isinstance(states, dict):
            raise TypeError(f"holds a {type(states).__name__}, not a dict")
        random.Random().setstate(states["random_state"])
        np.random.RandomState().set_state(states["numpy_random_seed"])
        torch.Generator().set_state(states["torch_manual_seed"])
        for key, value in states.items():  # device generators (torch_cuda_manual_seed, ...): byte tensors
            if key.startswith("torch_") and key.endswith("_manual_seed") and key != "torch_manual_seed":
                values = value if isinstance(value, (list, tuple)) else [value]
                if not all(isinstance(v, torch.Tensor) and v.dtype == torch.uint8 for v in values):
                    raise TypeError(f"{key} is not a generator state")
    except Exception as error:
        raise CheckpointVerificationError(
            f"{path} does not hold usable random-number-generator states ({type(error).__name__}: "
            f"{_one_line(error)}); Accelerate would skip it and the run would continue differently"
        ) from error


def _check_file(path: Path) -> None:
    name = path.name
    if name.endswith(".safetensors"):
        try:
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():  # noqa: SIM118 - a safetensors handle, not a dict
                    f.get_slice(key).get_shape()
        except Exception as error:
            raise CheckpointVerificationError(
                f"{path} is not a readable safetensors file: {_one_line(error)}"
            ) from error
    elif name.endswith(".json"):
        try:
            with open(path, encoding="utf-8") as f:
                payload = json.load(f)
        except (OSError, ValueError) as error:
            raise CheckpointVerificationError(f"{path} is not readable JSON: {_one_line(error)}") from error
        if name == TRAINER_STATE_NAME and not (isinstance(payload, dict) and isinstance(payload.get("step"), int)):
            raise CheckpointVerificationError(f"{path} does not record the training step")
    elif name.endswith(TORCH_SUFFIXES):
        payload = _read_torch_file(path)
        if name.startswith(RNG_STATE_PREFIX):
            _check_rng_states(path, payload)
    else:
        raise CheckpointVerificationError(
            f"refusing to resume: {path} is not a file a checkpoint holds (safetensors, JSON, torch.save states), "
            "so it cannot be checked"
        )


def verify_checkpoint(folder: str | os.PathLike, num_processes: int = 1) -> None:
    """Checks every file of ``folder`` (see the module docstring) and that the model, optimizer, trainer state and
    the random-number-generator states of processes ``0 .. num_processes - 1`` are there. Raises
    `CheckpointVerificationError` naming the first bad file."""
    folder = Path(folder)
    try:
        entries = sorted(folder.iterdir())
    except OSError as error:
        raise CheckpointVerificationError(f"cannot list the checkpoint {folder}: {error}") from error
    for entry in entries:
        if entry.is_dir() or not entry.is_file():
            raise CheckpointVerificationError(
                f"refusing to resume: {entry} is not a plain file (sharded states are not supported), so it "
                "cannot be checked"
            )
        _check_file(entry)
    names = {entry.name for entry in entries}
    for name in (TRAINER_STATE_NAME, *(f"{RNG_STATE_PREFIX}{i}.pkl" for i in range(num_processes))):
        if name not in names:
            raise CheckpointVerificationError(f"{folder / name} is missing: the checkpoint is incomplete")
    # the model and optimizer files are named by how they were saved (safetensors, FSDP full or per-rank states)
    for what, prefixes in (("model weights", ("model", "pytorch_model")), ("optimizer state", ("optimizer",))):
        if not any(name.startswith(prefixes) for name in names):
            raise CheckpointVerificationError(f"{folder} has no {what}: the checkpoint is incomplete")
