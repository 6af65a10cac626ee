"""The planner reproduces the published Minitron architectures and their parameter counts
(docs/design.md section 7), with three independent counts that agree: the closed form, the global
tensor shapes, and megatron's GPTModel built on the meta device (no weights allocated)."""

from __future__ import annotations

import pytest

from distributed import run_distributed
from nemo_minitron.pruning import PUBLISHED_RECIPES, PUBLISHED_TEACHERS, PruneSpec, count_from_shapes, plan
from nemo_minitron.pruning.planner import published_student
from tiny import tiny_arch

# (layers, hidden, ffn, heads, groups, vocab) of the published students
PUBLISHED_SHAPES = {
    "llama-3.1-minitron-4b-width": (32, 3072, 9216, 32, 8, 128256),
    "llama-3.1-minitron-4b-depth": (16, 4096, 14336, 32, 8, 128256),
    "mn-minitron-8b": (40, 4096, 11520, 32, 8, 131072),
    "minitron-8b": (32, 4096, 16384, 48, 8, 256000),
    "minitron-4b": (32, 3072, 9216, 32, 8, 256000),
    "qwen3-8b-to-6b": (30, 3584, 11776, 32, 8, 151936),
    "qwen3-30b-a3b-96-experts": (48, 2048, 6144, 32, 4, 151936),  # FFN: the unused dense width; 96 experts of 768
    "nemotron-nano-9b-v2": (56, 4480, 15680, 40, 8, 131072),  # and its Mamba layers: tests/test_hybrid.py
}


def meta_counts(archs):
    from nemo_minitron.pruning import count_on_meta

    return [count_on_meta(arch) for arch in archs]


def test_published_students_and_their_parameter_counts():
    assert PUBLISHED_TEACHERS["llama-3.1-8b"].num_parameters()["total"] == 8_030_261_248
    assert f"{PUBLISHED_TEACHERS['mistral-nemo-12b'].num_parameters()['total'] / 1e9:.1f}B" == "12.2B"
    # Nemotron-4-15B: 3.15B embedding + 12.48B non-embedding (the Nemotron-4 report rounds: 3.2B + 12.5B)
    nemotron = PUBLISHED_TEACHERS["nemotron-4-15b"].num_parameters()
    assert (nemotron["total"], nemotron["non_embedding"]) == (15_628_775_424, 12_483_047_424)
    # Qwen3-30B-A3B: the model card's 30.5B total and 3.3B activated
    qwen3_moe = PUBLISHED_TEACHERS["qwen3-30b-a3b"].num_parameters()
    assert (qwen3_moe["total"], qwen3_moe["active"]) == (30_532_122_624, 3_353_032_704)
    for name, recipe in PUBLISHED_RECIPES.items():
        teacher, student = published_student(name)
        shape = (student.num_layers, student.hidden_size, student.ffn_hidden_size, student.num_attention_heads,
                 student.num_query_groups, student.vocab_size)
        assert shape == PUBLISHED_SHAPES[name]
        assert student.kv_channels == teacher.kv_channels == 128
        digits = 2 if "." in recipe.published_params else 0  # the Minitron cards round to whole billions
        assert f"{student.num_parameters()['total'] / 1e9:.{digits}f}B" == recipe.published_params, name


def test_three_counts_agree():
    archs = [*PUBLISHED_TEACHERS.values(), *(published_student(n)[1] for n in PUBLISHED_RECIPES),
             tiny_arch(tie=True), tiny_arch(tie=False, num_query_groups=1), tiny_arch(tie=False, family="nemotron"),
             tiny_arch(tie=True, family="nemotron_h")]
    for arch in archs:
        counts = arch.num_parameters()  # (MoE models add "active")
        assert count_from_shapes(arch) == {"total": counts["total"], "non_embedding": counts["non_embedding"]}
    # Building Qwen3-30B-A3B's 6,144 expert modules takes ~30 s even on meta; tests/test_moe.py counts
    # the same MoE code on meta for tiny models of every MoE family.
    dense = [arch for arch in archs if not arch.is_moe]
    [on_meta] = run_distributed(meta_counts, world_size=1, args=(dense,))
    assert on_meta == [arch.num_parameters()["total"] for arch in dense]


def test_plan_reports_both_architectures():
    teacher = PUBLISHED_TEACHERS["llama-3.1-8b"]
    result = plan(teacher, PruneSpec(num_layers=16), tp=8, pp=4)
    assert result["teacher"]["num_layers"] == 32 and result["student"]["num_layers"] == 16
    assert result["kept_fraction"]["non_embedding"] == pytest.approx(0.5, abs=1e-4)
    with pytest.raises(ValueError, match=r"target\.num_layers=16 is not divisible by pp=3"):
        plan(teacher, PruneSpec(num_layers=16), pp=3)
