"""The published recipes compose, carry the papers' hyperparameters, and prune the published teachers
to the published architectures and sizes (docs/design.md sections 7, 14; no weights allocated)."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose
from omegaconf import OmegaConf

from nemo_minitron.cli.compose import hydra_conf
from nemo_minitron.pruning import PruneSpec
from nemo_minitron.pruning.planner import PUBLISHED_TEACHERS

CONF = Path(__file__).resolve().parents[1] / "nemo_minitron" / "conf"

# recipe -> (teacher, expected student (layers, hidden, ffn, heads, groups), total params in billions,
#            distillation (lr, min_lr, warmup, global batch, sequence), distillation tokens in billions,
#            teacher correction)
RECIPES = {
    "llama31_minitron_4b_width": ("llama-3.1-8b", (32, 3072, 9216, 32, 8), 4.51, (1e-4, 1e-5, 40, 1152, 8192), 94, True),
    "llama31_minitron_4b_depth": ("llama-3.1-8b", (16, 4096, 14336, 32, 8), 4.54, (1e-4, 1e-5, 40, 1152, 8192), 94, True),
    "mn_minitron_8b": ("mistral-nemo-12b", (40, 4096, 11520, 32, 8), 8.41, (1e-4, 4.5e-7, 60, 768, 8192), 380, True),
    "nemotron4_minitron_8b": ("nemotron-4-15b", (32, 4096, 16384, 48, 8), 8.27, (1e-4, 1e-5, 40, 1152, 4096), 94, False),
    "nemotron4_minitron_4b": ("minitron-8b", (32, 3072, 9216, 32, 8), 4.39, (1e-4, 1e-5, 40, 1152, 4096), 94, False),
    "qwen3_8b_to_6b": ("qwen3-8b", (30, 3584, 11776, 32, 8), 5.99, (1e-4, 1e-5, 40, 1152, 8192), 94, False),
    # the MoE cut keeps every shape key and 96 of 128 experts (the FFN is its unused dense width)
    "qwen3_30b_a3b_96_experts": ("qwen3-30b-a3b", (48, 2048, 6144, 32, 4), 23.28, (1e-4, 1e-5, 40, 1152, 8192), 94,
                                 False),
    # the hybrid cut: its Mamba shapes and pattern are checked in test_hybrid.py
    "nemotron_nano_9b_v2": ("nemotron-nano-12b-v2", (56, 4480, 15680, 40, 8), 8.89, (1e-4, 4.5e-7, 60, 768, 8192),
                            380, False),
}


def compose_recipe(name: str):
    with hydra_conf(CONF):
        return compose(config_name=f"recipes/{name}", overrides=["teacher.hf_path=/m", "corpus.user_paths=[/d]"])


def test_every_recipe_file_is_tested():
    assert {p.stem for p in (CONF / "recipes").glob("*.yaml")} == set(RECIPES)


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_reproduces_the_published_model(name):
    teacher_name, shape, billions, (lr, min_lr, warmup, batch, seq), tokens_b, corrected = RECIPES[name]
    cfg = compose_recipe(name)
    teacher = PUBLISHED_TEACHERS[teacher_name]
    target = {k: v for k, v in OmegaConf.to_container(cfg.prune.target).items()}
    # the recipes' launcher layouts: tp=8, or tp=1 with the experts over ep=8
    student = PruneSpec.from_dict(target).target_arch(teacher, *((1, 1, 8) if teacher.is_moe else (8, 1, 1)))
    assert (student.num_layers, student.hidden_size, student.ffn_hidden_size, student.num_attention_heads,
            student.num_query_groups) == shape
    assert student.num_parameters()["total"] / 1e9 == pytest.approx(billions, abs=0.01)
    d = cfg.distill
    assert (d.optim.lr, d.optim.min_lr, d.optim.warmup_steps, d.train.global_batch_size) == (lr, min_lr, warmup, batch)
    assert d.train.seq_length == seq and d.loss.kind == "fwd_kl" and d.loss.lm_weight == 0
    assert d.train.steps * batch * seq / 1e9 == pytest.approx(tokens_b, rel=0.001)
    tc = cfg.teacher_correct
    assert tc.enabled == corrected
    if corrected:  # the corrected teacher pruned, ~100B tokens at 1/5 of the original peak LR, 120 warmup steps
        assert cfg.prune_from == "corrected"
        assert tc.optim.lr is None and tc.original_peak_lr == 3.0e-4 and tc.optim.warmup_steps == 120
        assert tc.train.steps * tc.train.global_batch_size * tc.train.seq_length / 1e9 == pytest.approx(100, rel=0.01)


def test_nemotron_4b_step_starts_from_the_8b_step():
    """15B -> 8B -> 4B: step 2's teacher is step 1's exported student unless overridden."""
    with hydra_conf(CONF):
        step2 = compose(config_name="recipes/nemotron4_minitron_4b", overrides=["corpus.user_paths=[/d]"])
    step1 = compose_recipe("nemotron4_minitron_8b")
    assert step2.teacher.hf_path == f"{step1.work_dir}/student_hf"
