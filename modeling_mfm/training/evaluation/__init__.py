"""Evaluation and pictures: the linear probe and kNN (`linear_probe`), ImageNet-C/A/R/Sketch robustness (`robustness`,
`robustness_classes`), top-k accuracy (`classification_metrics`), the representation monitor of pre-training, and
the reconstruction and corruption pictures (`visualization`, `visualization_corruptions`)."""
