"""Safe reading of the official MFM checkpoint files (``.pth``).

The official training code saves ``{"model": state_dict, "optimizer": ..., "lr_scheduler": ..., "epoch": ...,
"config": <yacs CfgNode>}``; timm's training script (used for the official ResNet-50 fine-tuning) saves
``{"state_dict": ..., "args": <argparse.Namespace>, ...}``. Unpickling such a file with ``weights_only=False`` would
run whatever code the file names, so these files are read with ``torch.load(weights_only=True)``: only tensors,
plain containers and two allow-listed globals are accepted:

* ``yacs.config.CfgNode`` is resolved to ``collections.OrderedDict``: a CfgNode is a dict subclass pickled as
  "new empty object, set items, set attributes", which an OrderedDict absorbs without running any code (its
  attributes such as ``__immutable__`` land in the instance ``__dict__`` and are dropped). yacs is not needed.
* ``argparse.Namespace`` (timm's ``args``): a plain attribute holder.

Anything else (for example a ``__reduce__`` that names ``os.system``) is refused before it is called.
"""

from __future__ import annotations

import argparse
import os
import pickle
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["OfficialCheckpoint", "UnsafeCheckpointError", "load_official_checkpoint", "to_plain"]

# Globals the official files need beyond what torch's weights-only unpickler allows by default.
_CFGNODE_PATH = "yacs.config.CfgNode"
SAFE_GLOBALS: list = [(OrderedDict, _CFGNODE_PATH), argparse.Namespace]

# Phrases of torch's weights-only refusals that concern objects (as opposed to a malformed byte stream).
_UNSAFE_MARKERS = ("global", "can only create new object", "trying to call reduce", "can only build")

# Keys under which known training scripts store the weights, in order of preference.
_STATE_DICT_KEYS = ("model", "state_dict", "module")


class UnsafeCheckpointError(ValueError):
    """The file contains pickled objects other than tensors, plain containers and the official config."""


@dataclass
class OfficialCheckpoint:
    """What a converter needs from an official file.

    Attributes:
        state_dict: parameter name -> tensor, exactly as stored (a DDP ``module.`` prefix removed).
        config: the stored yacs config as nested plain dicts (``config["DATA"]["FILTER_TYPE"]``), or None.
        args: the stored timm ``args`` as a plain dict, or None.
        metadata: the other top-level scalars (epoch, max_accuracy, ...); optimizer and scheduler states are dropped.
        source_key: where the weights were found ("model", "state_dict", ... or "" for a bare state dict).
    """

    state_dict: dict[str, torch.Tensor]
    config: dict[str, Any] | None = None
    args: dict[str, Any] | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    source_key: str = ""

    def config_value(self, dotted: str, default: Any = None) -> Any:
        """``config_value("DATA.MASK_RADIUS1")``: a value of the stored yacs config, or ``default``."""
        node: Any = self.config
        for part in dotted.split("."):
            if not isinstance(node, Mapping) or part not in node:
                return default
            node = node[part]
        return node


def to_plain(obj: Any) -> Any:
    """Nested CfgNode/OrderedDict/Namespace/tuple/set -> plain dicts and lists (JSON-friendly, order kept)."""
    if isinstance(obj, argparse.Namespace):
        obj = vars(obj)
    if isinstance(obj, Mapping):
        return {str(k): to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    if isinstance(obj, (set, frozenset)):
        return sorted(to_plain(v) for v in obj)
    return obj


def _unpickler_reason(message: str) -> str:
    """The specific part of torch's weights-only refusal, without its generic preamble (which suggests
    ``weights_only=False``, exactly what must not be done with an untrusted file)."""
    generic = ("Weights only load failed", "Please file an issue", "Check the documentation", "In PyTorch 2.6")
    message = message.replace("WeightsUnpickler error:", "\n")
    lines = [line.strip() for line in message.splitlines()]
    specific = [line for line in lines if line and not line.startswith(generic)]
    return " ".join(specific) or "unsupported pickle content"


def _read(path: str) -> Any:
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        reason = _unpickler_reason(str(error))
        if not any(marker in reason.lower() for marker in _UNSAFE_MARKERS):
            raise ValueError(
                f"{path} is not a readable PyTorch checkpoint (truncated or corrupt?): {reason}"
            ) from error
        # A weights-only refusal of a named global or of building/calling an object. Name the offending globals
        # when the file lists them; listing only scans the pickle, it executes nothing.
        try:
            unsafe = [
                name
                for name in torch.serialization.get_unsafe_globals_in_checkpoint(path)
                if name not in (_CFGNODE_PATH, "argparse.Namespace")
            ]
        except Exception:  # legacy (non-zip) file: the unpickler's reason is all we have
            unsafe = []
        detail = f"it names {', '.join(unsafe)}" if unsafe else reason
        raise UnsafeCheckpointError(
            f"refusing to load {path}: it contains pickled objects other than tensors, plain containers and the "
            f"official config ({detail}). Official MFM checkpoints need none; the file is damaged or not an "
            "official checkpoint"
        ) from error
    except (RuntimeError, EOFError, OSError, ValueError, KeyError) as error:
        raise ValueError(
            f"{path} is not a readable PyTorch checkpoint (truncated or corrupt download?): {error}"
        ) from error


def _find_state_dict(payload: Any, path: str) -> tuple[dict[str, torch.Tensor], str]:
    if not isinstance(payload, Mapping):
        raise ValueError(f"{path} holds a {type(payload).__name__}, expected a dict with the model weights")
    for key in _STATE_DICT_KEYS:
        if key in payload and isinstance(payload[key], Mapping):
            return dict(payload[key]), key
    if payload and all(isinstance(v, torch.Tensor) for v in payload.values()):
        return dict(payload), ""
    raise ValueError(
        f"{path} has no model weights: expected a state dict or a dict with one of {list(_STATE_DICT_KEYS)}, "
        f"found keys {sorted(map(str, payload))}"
    )


def load_official_checkpoint(path: str | os.PathLike) -> OfficialCheckpoint:
    """Reads an official MFM (or timm) checkpoint without executing pickled code.

    Raises:
        FileNotFoundError: the path does not exist.
        UnsafeCheckpointError: the file names globals outside the allow-list (nothing from it was executed).
        ValueError: the file is truncated/corrupt, or holds no state dict of tensors.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    payload = _read(path)
    state_dict, source_key = _find_state_dict(payload, path)
    not_tensors = [k for k, v in state_dict.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise ValueError(f"{path}: state dict entries are not tensors: {not_tensors[:5]}")
    if state_dict and all(k.startswith("module.") for k in state_dict):
        state_dict = {k[len("module.") :]: v for k, v in state_dict.items()}

    config = args = None
    metadata: dict[str, Any] = {}
    if source_key:
        if isinstance(payload.get("config"), Mapping):
            config = to_plain(payload["config"])
        if isinstance(payload.get("args"), (argparse.Namespace, Mapping)):
            args = to_plain(payload["args"])
        metadata = {
            str(k): v for k, v in payload.items() if isinstance(v, (int, float, str, bool)) and k != source_key
        }
    return OfficialCheckpoint(state_dict, config=config, args=args, metadata=metadata, source_key=source_key)
