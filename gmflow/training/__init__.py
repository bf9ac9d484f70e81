"""The GMFlow trainer: ``train(cfg, run_dir)`` (single process or torchrun) and its parts."""

from gmflow.training.loop import TrainResult, train

__all__ = ["train", "TrainResult"]
