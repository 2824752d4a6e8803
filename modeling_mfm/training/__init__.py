"""Code the run_scripts share (data, optimisation, schedules, checkpoints, pictures, model cards): importable and
tested. `run_pretraining` is the pre-training entry point used by ``run_scripts/run_pretrain.py``.

Training needs more than loading a model does: the ``train`` extra (``pip install 'masked-frequency-modeling[train]'``).
Without it, importing this package names what is missing instead of failing deep inside a module.
"""

from importlib.util import find_spec

TRAINING_REQUIREMENTS = ("accelerate", "datasets", "evaluate", "torchvision", "tqdm", "matplotlib")

_missing = [name for name in TRAINING_REQUIREMENTS if find_spec(name) is None]
if _missing:
    raise ImportError(f"modeling_mfm.training needs {', '.join(_missing)}, which the core install leaves out: "
                      "pip install 'masked-frequency-modeling[train]'")
