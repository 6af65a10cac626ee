"""minitron teacher-correct: fine-tune the teacher on the distillation data with the LM loss."""

from nemo_minitron.cli.compose import typed
from nemo_minitron.distill.stage import TeacherCorrectConfig, correct_teacher


def run(cfg) -> dict:
    return correct_teacher(typed(TeacherCorrectConfig, cfg))
