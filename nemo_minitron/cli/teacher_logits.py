"""minitron teacher-logits: an offline teacher, the top-k logits over a distillation run's samples."""

from nemo_minitron.cli.compose import typed
from nemo_minitron.distill.stage import TeacherLogitsConfig, cache_teacher_logits


def run(cfg) -> dict:
    return cache_teacher_logits(typed(TeacherLogitsConfig, cfg))
