"""Training: the loop, its config, checkpoints (one atomic file) and run directories."""

from minilora.train.checkpoint import (
    Checkpoint,
    model_fingerprint,
    read_checkpoint,
    write_checkpoint,
)
from minilora.train.config import TrainConfig
from minilora.train.loop import TrainResult, estimate_loss, train
from minilora.train.rundir import RunDir
from minilora.train.sources import LoadedRun, load_run

__all__ = ["Checkpoint", "LoadedRun", "RunDir", "TrainConfig", "TrainResult", "estimate_loss",
           "load_run", "model_fingerprint", "read_checkpoint", "train", "write_checkpoint"]
