"""Training: the loop, its config, and run directories with atomic checkpoints."""

from minilora.train.checkpoint import (
    Checkpoint,
    LoadedRun,
    RunDir,
    load_run,
    model_fingerprint,
    read_checkpoint,
    write_checkpoint,
)
from minilora.train.config import TrainConfig
from minilora.train.loop import TrainResult, estimate_loss, train

__all__ = ["Checkpoint", "LoadedRun", "RunDir", "TrainConfig", "TrainResult", "estimate_loss",
           "load_run", "model_fingerprint", "read_checkpoint", "train", "write_checkpoint"]
