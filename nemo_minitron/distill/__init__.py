"""Knowledge distillation: a frozen teacher and a student on the same ranks, or an offline
teacher's top-k logits (teacher caches); vocab-parallel losses."""

from nemo_minitron.distill.losses import (
    LOGIT_LOSSES,
    LogitLoss,
    TopKTeacher,
    cosine_loss,
    logit_losses,
    reference_logit_losses,
    teacher_top_k,
)
from nemo_minitron.distill.model import (
    DistillationLoss,
    DistillationModel,
    DistillationOutput,
    LayerPair,
    check_same_tokenizer,
)
from nemo_minitron.distill.teacher_cache import TeacherCache, write_teacher_cache

__all__ = [
    "LOGIT_LOSSES", "DistillationLoss", "DistillationModel", "DistillationOutput", "LayerPair", "LogitLoss",
    "TeacherCache", "TopKTeacher", "check_same_tokenizer", "cosine_loss", "logit_losses", "reference_logit_losses",
    "teacher_top_k", "write_teacher_cache",
]
