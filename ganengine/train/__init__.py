"""Training engine: the loop, AMP, DDP, checkpoints, logs (see docs/training.md).

``train(TrainConfig(...))`` runs a training; ``ganengine.train.checkpoint.load_model(path)``
rebuilds a trained model from a checkpoint.
"""
from ganengine.train.checkpoint import CheckpointError, load_model
from ganengine.train.context import AMP_MODES, AmpContext
from ganengine.train.ema import EMA
from ganengine.train.engine import NonFiniteLossError, TrainConfig, Trainer, train

__all__ = ["AMP_MODES", "AmpContext", "CheckpointError", "NonFiniteLossError", "TrainConfig", "Trainer",
           "load_model", "train"]
