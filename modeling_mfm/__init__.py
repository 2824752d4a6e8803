"""Masked Frequency Modeling (ICLR 2023) for the Hugging Face ecosystem.

Importing the package registers MFM with the transformers Auto classes, and marks the classes for remote code so
that `save_pretrained` ships the modeling files (users without this package load with `trust_remote_code=True`).
The opt-in speed-ups the scripts use are in `modeling_mfm.fast_paths`.
"""

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForImageClassification,
    AutoModelForPreTraining,
)

from .configuration_mfm import PRESETS, MFMConfig, official_mask_radius
from .frequency import (
    FrequencyLoss,
    filter_frequencies,
    high_pass_mask,
    low_pass_mask,
    masked_frequency_loss,
    sample_frequency_masks,
)
from .modeling_mfm import (
    DEFAULT_CROP_PCT,
    MFMForImageClassification,
    MFMForPreTraining,
    MFMForPreTrainingOutput,
    MFMModel,
    MFMModelOutput,
    MFMPreTrainedModel,
    build_image_processor,
)

__version__ = "0.2.0"

AutoConfig.register("mfm", MFMConfig, exist_ok=True)
AutoModel.register(MFMConfig, MFMModel, exist_ok=True)
AutoModelForPreTraining.register(MFMConfig, MFMForPreTraining, exist_ok=True)
AutoModelForImageClassification.register(MFMConfig, MFMForImageClassification, exist_ok=True)

MFMConfig.register_for_auto_class()
MFMModel.register_for_auto_class("AutoModel")
MFMForPreTraining.register_for_auto_class("AutoModelForPreTraining")
MFMForImageClassification.register_for_auto_class("AutoModelForImageClassification")

__all__ = [
    "DEFAULT_CROP_PCT",
    "PRESETS",
    "FrequencyLoss",
    "MFMConfig",
    "MFMForImageClassification",
    "MFMForPreTraining",
    "MFMForPreTrainingOutput",
    "MFMModel",
    "MFMModelOutput",
    "MFMPreTrainedModel",
    "build_image_processor",
    "filter_frequencies",
    "high_pass_mask",
    "low_pass_mask",
    "masked_frequency_loss",
    "official_mask_radius",
    "sample_frequency_masks",
]
