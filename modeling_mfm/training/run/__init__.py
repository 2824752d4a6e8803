"""What keeps a run reliable and observable: the output folder and its resume rule (`run_folder`), atomic checkpoints
and their safe verification, disk faults, indexed randomness, device-side step statistics, trackers and
`metrics.jsonl`, and memory and hardware monitoring."""
