"""Models for the loops: the pre-training model with its memory format and cuDNN settings (`model_factory`), and a
classifier or encoder from a checkpoint, a native encoder or a preset (`model_loading`)."""
