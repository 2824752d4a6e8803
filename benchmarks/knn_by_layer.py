#!/usr/bin/env python
"""kNN top-1 of every layer of pre-trained encoders on the held-out slice: where in the network the features that a
nearest-neighbour classifier can use live, for MFM against the random initialisation of the same model.

The feature of layer i is LayerNorm (no affine) of the mean patch token of the i-th hidden state (0: the patch
embeddings), the monitor's feature (``training.evaluation.representation_monitor``) taken at every depth; the last
row is the encoder's output after its final LayerNorm. The bank is a stratified choice of the training rows outside
the slice.

    python benchmarks/knn_by_layer.py --model_name_or_path study/pretrain-mfm study/init-random \\
        --train_file 'cifar10/*.parquet' --validation_split_size 5000 --output_dir knn-layers
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from modeling_mfm.cli import ScriptArgumentParser, ScriptError, run_script


@dataclass
class LayerArguments:
    model_name_or_path: list[str] = field(metadata={"help": "Pre-training folders (MFMForPreTraining) to compare."})
    train_file: str = field(metadata={"help": "Labelled data files (as run_finetune.py's --train_file)."})
    output_dir: str = field(metadata={"help": "Where knn_by_layer.json goes."})
    validation_split_size: int = field(default=5000, metadata={"help": "The held-out slice (queries)."})
    validation_split_seed: int = field(default=0, metadata={"help": "Its seed."})
    bank_size: int = field(default=10000, metadata={"help": "Training images in the kNN bank (stratified)."})
    knn_k: int = field(default=20, metadata={"help": "Neighbours that vote."})
    knn_temperature: float = field(default=0.07, metadata={"help": "Vote weight exp(similarity / T)."})


def layer_features(model, images, batch_size: int = 500):
    """A list over depth of (N, D) features of uint8 images (see the module docstring)."""
    import torch
    import torch.nn.functional as F

    per_layer: list[list[torch.Tensor]] = []
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            pixels = model.normalize(images[start:start + batch_size].float() / 255.0)
            output = model.mfm(pixels, output_hidden_states=True)
            states = [*output.hidden_states, output.last_hidden_state]
            for depth, hidden in enumerate(states):
                pooled = hidden[:, 1:].float().mean(dim=1)
                if depth == len(per_layer):
                    per_layer.append([])
                per_layer[depth].append(F.layer_norm(pooled, pooled.shape[-1:]))
    return [torch.cat(chunks) for chunks in per_layer]


def main(argv: Sequence[str] | None = None) -> int:
    parser = ScriptArgumentParser(LayerArguments, prog="knn_by_layer.py", description=__doc__.split("\n\n")[0])
    (args,) = parser.parse_args_into_dataclasses(argv)
    from modeling_mfm import MFMForPreTraining
    from modeling_mfm.training.data.classification_data import ClassificationDataArguments
    from modeling_mfm.training.data.device_dataset import load_device_images
    from modeling_mfm.training.data.holdout import stratified_subset
    from modeling_mfm.training.evaluation.representation_monitor import knn_top1

    try:
        models = {path: MFMForPreTraining.from_pretrained(path).eval() for path in args.model_name_or_path}
        data = ClassificationDataArguments(train_file=args.train_file, validation_split_size=args.validation_split_size,
                                           validation_split_seed=args.validation_split_seed).load_datasets(0)
    except (OSError, ValueError) as error:
        raise ScriptError(str(error)) from error
    size = next(iter(models.values())).config.image_size
    bank_rows = stratified_subset(data.train, data.label_column, args.bank_size, args.validation_split_seed)
    bank = load_device_images(bank_rows, data.image_column, size, "cpu", label_column=data.label_column)
    queries = load_device_images(data.validation, data.image_column, size, "cpu", label_column=data.label_column)
    results = {}
    for path, model in models.items():
        bank_features = layer_features(model, bank.images)
        query_features = layer_features(model, queries.images)
        results[path] = [round(float(knn_top1(b, bank.labels, q, queries.labels, len(data.labels), args.knn_k,
                                              args.knn_temperature)), 2)
                         for b, q in zip(bank_features, query_features)]
    output = Path(args.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    record = {"bank": len(bank.images), "queries": len(queries.images), "knn_top1_by_depth": results}
    (output / "knn_by_layer.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    depth = max(len(v) for v in results.values())
    print("| depth | " + " | ".join(Path(p).name for p in results) + " |")
    print("| --- |" + " --- |" * len(results))
    for i in range(depth):
        name = "embeddings" if i == 0 else ("output (final norm)" if i == depth - 1 else f"layer {i}")
        print(f"| {name} | " + " | ".join(f"{v[i]:.2f}" for v in results.values()) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(run_script(main))
