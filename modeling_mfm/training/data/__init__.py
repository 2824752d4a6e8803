"""What the loops read: pre-training datasets, streams and the bundled photos (`sources`), labelled data
(`classification_data`), local data files and image folders, the held-out slice (`holdout`), the augmentations
(`transforms`, `mixup`), device decoding and device-resident datasets, and the pre-training loader
(`pretraining_data`)."""
