"""Distributed checkpointing (DCP): atomic saves, resume, resharding, and Hugging Face conversion.

See docs/checkpoint.md. The trainer uses `CheckpointManager`; `hf_convert` is the command line for
importing and exporting Hugging Face Llama weights.
"""

from torchtitan_like.checkpoint.manager import CheckpointManager, create_seed_checkpoint
from torchtitan_like.checkpoint.state import TRAIN_STATE_KEY, TrainState

__all__ = ["CheckpointManager", "TRAIN_STATE_KEY", "TrainState", "create_seed_checkpoint"]
