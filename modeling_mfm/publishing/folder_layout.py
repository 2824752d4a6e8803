"""The names inside an output folder, one spelling each. The training loops write them, the Hub publisher leaves the
run's by-products out (`hub.PUBLISH_IGNORE_PATTERNS`), the converter writes the card, and the study reads them; they
live here, the lowest layer that training, conversion and publishing all import."""

from __future__ import annotations

__all__ = [
    "CHECKPOINTS_FOLDER",
    "LOGS_FOLDER",
    "MODEL_CARD_FILE",
    "PICTURES_FOLDER",
    "RECONSTRUCTION_PICTURE",
    "RESULTS_FILE",
]

MODEL_CARD_FILE = "README.md"  # the Hub's model card
RESULTS_FILE = "all_results.json"  # fine-tuning's and segmentation's results, as transformers' example scripts name it
RECONSTRUCTION_PICTURE = "reconstruction.png"  # the latest reconstruction picture, shown in the model card
# a run's by-products, never published
CHECKPOINTS_FOLDER = "checkpoints"  # resumable training states
LOGS_FOLDER = "logs"  # tracker logs: TensorBoard events, metrics.jsonl
PICTURES_FOLDER = "reconstructions"  # the reconstruction picture of every visualisation step
