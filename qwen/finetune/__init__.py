"""Supervised fine-tuning of Qwen (v1) checkpoints: full, LoRA and Q-LoRA, on the Hugging Face Trainer
with optional DeepSpeed (`finetune.py`, finetune/*.sh). Data and label masking live in `data`, the
training entry point in `train`; merging adapters is `python -m qwen.tools.merge_lora`."""

from .data import (
                   IGNORE_INDEX,
                   Conversation,
                   DataCollator,
                   DataError,
                   LazySupervisedDataset,
                   SupervisedDataset,
                   check_record,
                   encode_conversation,
                   make_dataset,
)

__all__ = ["IGNORE_INDEX", "Conversation", "DataCollator", "DataError", "LazySupervisedDataset", "SupervisedDataset",
           "check_record", "encode_conversation", "make_dataset"]
