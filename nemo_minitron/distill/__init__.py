"""Knowledge distillation: a frozen teacher and a student on the same ranks, vocab-parallel losses."""

from nemo_minitron.distill.losses import LOGIT_LOSSES, LogitLoss, cosine_loss, logit_losses, reference_logit_losses
from nemo_minitron.distill.model import (
    DistillationLoss,
    DistillationModel,
    DistillationOutput,
    LayerPair,
    check_same_tokenizer,
)

__all__ = [
    "LOGIT_LOSSES", "DistillationLoss", "DistillationModel", "DistillationOutput", "LayerPair", "LogitLoss",
    "check_same_tokenizer", "cosine_loss", "logit_losses", "reference_logit_losses",
]
