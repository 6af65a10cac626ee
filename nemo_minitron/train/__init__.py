"""The training loop shared by teacher correction, distillation and alignment."""

from nemo_minitron.train.config import OptimConfig, TrainConfig
from nemo_minitron.train.data import TokenWindows, TrainingData, gpt_training_data
from nemo_minitron.train.loop import FINAL_DIR, Trainer
from nemo_minitron.train.loss import LMLoss, LossResult, TrainingLoss, masked_mean

__all__ = [
    "FINAL_DIR", "LMLoss", "LossResult", "OptimConfig", "TokenWindows", "TrainConfig", "Trainer", "TrainingData",
    "TrainingLoss",
    "gpt_training_data", "masked_mean",
]
