"""Code the run_scripts share (data, optimisation, schedules, checkpoints, pictures, model cards): importable and
tested. `run_pretraining` is the pre-training entry point used by ``run_scripts/run_pretrain.py``."""
