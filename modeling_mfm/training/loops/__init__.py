"""The training loops, each told top to bottom: MFM pre-training (`pretrain`, with its flags in
`pretraining_arguments`), classification fine-tuning (`finetune`) and UperNet segmentation (`segmentation_training`
with `segmentation_model`)."""
