"""Optimisation: AdamW parameter groups and the lr scaling rule (`optimizer`), layer-wise lr decay (`layer_decay`) and
the one learning-rate schedule (`schedules`)."""
