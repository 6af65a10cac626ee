"""The published recipes compose, carry the papers' hyperparameters, and prune the published teachers
to the published architectures and sizes (DESIGN.md sections 1, 7, 8; no weights allocated)."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from nemo_minitron.prune import PruneSpec
from nemo_minitron.prune.planner import PUBLISHED_TEACHERS

CONF = Path(__file__).resolve().parents[1] / "conf"

# recipe -> (teacher, expected student (layers, hidden, ffn, heads, groups), total params in billions,
#            distillation (lr, min_lr, warmup, global batch), distillation tokens in billions)
RECIPES = {
    "llama31_minitron_4b_width": ("llama-3.1-8b", (32, 3072, 9216, 32, 8), 4.51, (1e-4, 1e-5, 40, 1152), 94),
    "llama31_minitron_4b_depth": ("llama-3.1-8b", (16, 4096, 14336, 32, 8), 4.54, (1e-4, 1e-5, 40, 1152), 94),
    "mn_minitron_8b": ("mistral-nemo-12b", (40, 4096, 11520, 32, 8), 8.41, (1e-4, 4.5e-7, 60, 768), 380),
}


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_reproduces_the_published_model(name):
    teacher_name, shape, billions, (lr, min_lr, warmup, batch), tokens_b = RECIPES[name]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name=f"recipes/{name}", overrides=["teacher.hf_path=/m", "corpus.user_paths=[/d]"])
    teacher = PUBLISHED_TEACHERS[teacher_name]
    target = {k: v for k, v in OmegaConf.to_container(cfg.prune.target).items()}
    student = PruneSpec.from_dict(target).target_arch(teacher, 8, 1)
    assert (student.num_layers, student.hidden_size, student.ffn_hidden_size, student.num_attention_heads,
            student.num_query_groups) == shape
    assert student.num_parameters()["total"] / 1e9 == pytest.approx(billions, abs=0.01)
    d = cfg.distill
    assert (d.optim.lr, d.optim.min_lr, d.optim.warmup_steps, d.train.global_batch_size) == (lr, min_lr, warmup, batch)
    assert d.train.seq_length == 8192 and d.loss.kind == "fwd_kl" and d.loss.lm_weight == 0
    assert d.train.steps * batch * 8192 / 1e9 == pytest.approx(tokens_b, rel=0.001)
    tc = cfg.teacher_correct
    assert tc.enabled and tc.optim.warmup_steps == 120
    assert tc.train.steps * tc.train.global_batch_size * 8192 / 1e9 == pytest.approx(100, rel=0.01)
