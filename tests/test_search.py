"""`minitron search`: grid enumeration under budgets (closed-form counts), dense and
mixture-of-experts, and resumable searches on tiny teachers (zero-shot scoring, local retraining,
slurm dry-run; an MoE teacher's experts and expert width)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nemo_minitron import checkpoint
from nemo_minitron.pruning import PUBLISHED_TEACHERS, count_from_shapes
from nemo_minitron.search import Budget, SearchSpace, candidate_name, enumerate_candidates
from commands import last_json, minitron
from shared import copy_tiny_teacher
from tiny import SENTENCES, tiny_arch, tiny_moe_arch, write_hf_dir

LLAMA = PUBLISHED_TEACHERS["llama-3.1-8b"]
QWEN3_MOE = PUBLISHED_TEACHERS["qwen3-30b-a3b"]


def test_llama_4_5b_budget_finds_minitron_width():
    found = enumerate_candidates(LLAMA, SearchSpace(), Budget(params=4.5e9))
    names = {candidate_name(a) for a in found}
    assert "L32-H3072-F9216-A32-G8" in names  # Llama-3.1-Minitron-4B-Width
    assert "L16-H4096-F14336-A32-G8" in names  # ...-Depth (teacher values are always on the grid)
    for arch in found:
        total = count_from_shapes(arch)["total"]  # counted from the tensor shapes, not the formula
        assert abs(total - 4.5e9) <= 0.05 * 4.5e9
        assert arch.hidden_size % 256 == 0 and arch.ffn_hidden_size % 512 == 0
        assert arch.num_attention_heads % arch.num_query_groups == 0
        assert arch.num_attention_heads // arch.num_query_groups <= 4


def test_parallel_divisibility_and_other_budgets():
    space = SearchSpace(layer_multiple=4)
    for arch in enumerate_candidates(LLAMA, space, Budget(params=4.5e9), tp=8, pp=4):
        assert arch.num_layers % 4 == 0 and arch.num_query_groups % 8 == 0 and arch.ffn_hidden_size % 8 == 0
    non_emb = Budget(non_embedding_params=3.5e9, tolerance=0.02)
    assert all(abs(a.num_parameters()["non_embedding"] - 3.5e9) <= 0.07e9
               for a in enumerate_candidates(LLAMA, space, non_emb))
    # bf16 weights + KV cache of 8 x 8192 tokens: 2 * layers * groups * 128 values per token
    memory = Budget(memory_bytes=12e9, memory_batch_size=8, memory_seq_length=8192)
    width = LLAMA.replace(hidden_size=3072, ffn_hidden_size=9216)
    assert memory.memory(width) == 2 * (width.num_parameters()["total"] + 2 * 32 * 8 * 128 * 8 * 8192)
    assert all(abs(memory.memory(a) - 12e9) <= 0.6e9 for a in enumerate_candidates(LLAMA, space, memory))
    with pytest.raises(ValueError, match="exactly one of budget"):
        Budget(params=1e9, memory_bytes=1e9).validate()


def test_moe_budget_searches_experts_and_expert_width():
    """Qwen3-30B-A3B at its depth, hidden size and attention: the grid over routed experts (multiples
    of 8 and of ep, at least the router's top-k) and expert FFN widths holds the recipe's 96-expert
    cut; `ffn_hidden_size`, which MoE layers do not use, is not an axis."""
    fixed = {"num_layers": [48], "hidden_size": [2048], "num_attention_heads": [32], "num_query_groups": [4]}
    space = SearchSpace(choices=fixed)
    found = enumerate_candidates(QWEN3_MOE, space, Budget(params=23.28e9, tolerance=0.03), ep=8)
    assert "L48-H2048-A32-G4-E96-M768" in {candidate_name(a) for a in found}
    for arch in found:
        assert arch.num_moe_experts % 8 == 0 and arch.num_moe_experts >= 8 and arch.moe_ffn_hidden_size % 128 == 0
        assert arch.ffn_hidden_size == QWEN3_MOE.ffn_hidden_size
        assert abs(count_from_shapes(arch)["total"] - 23.28e9) <= 0.03 * 23.28e9  # from the tensor shapes
    # Active parameters follow the top-8 experts' width, hardly the expert count: 2.5B +- 5% is
    # expert FFN 384 (2.45B active) with any number of experts, 64 to 128.
    active = enumerate_candidates(QWEN3_MOE, space, Budget(active_params=2.5e9), ep=8)
    assert {a.moe_ffn_hidden_size for a in active} == {384}
    assert {a.num_moe_experts for a in active} == set(range(64, 129, 8))
    assert all(abs(a.num_parameters()["active"] - 2.5e9) <= 0.05 * 2.5e9 for a in active)
    assert all(a.num_moe_experts % 16 == 0 for a in enumerate_candidates(QWEN3_MOE, space, Budget(params=23.28e9),
                                                                         ep=16))
    with pytest.raises(ValueError, match="unknown search.space.choices keys"):
        SearchSpace(choices={"experts": [8]})


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tiny_teacher_source) -> Path:
    root = tmp_path_factory.mktemp("search")
    copy_tiny_teacher(tiny_teacher_source, root)
    for split, shift in (("calib", 0), ("train", 1), ("valid", 2)):
        docs = [" ".join(SENTENCES[(i + shift) % 4:] + SENTENCES[: (i + shift) % 4]) * 3 for i in range(16)]
        (root / f"{split}.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return root


def search_args(root: Path, out: Path, *extra: str) -> list[str]:
    # tiny teacher: 4 layers, hidden 64, ffn 96, 4 heads / 2 groups; ~60% of its non-embedding params
    return ["search", f"checkpoint={root / 'teacher'}", f"output_dir={out}", "budget.non_embedding_params=6.5e4",
            "budget.tolerance=0.15", "search.space.hidden_multiple=16", "search.space.ffn_multiple=32",
            "search.space.choices.num_query_groups=[2]", "search.max_candidates=3",
            f"++prune.calib.data={root / 'calib.jsonl'}", "++prune.calib.num_samples=8", "++prune.calib.seq_len=16",
            "++prune.calib.micro_batch_size=2", "++prune.loss_samples=4", "search.retrain_steps=2",
            f"++distill.data.train={root / 'train.jsonl'}", f"++distill.data.valid={root / 'valid.jsonl'}",
            f"++distill.data.cache_dir={root / 'cache'}", "++distill.train.global_batch_size=2",
            "++distill.train.seq_length=16", "++distill.train.progress_bar=false", "++distill.train.eval_batches=1",
            "++distill.optim.warmup_steps=0", *extra]


@pytest.mark.slow
def test_search_resumes_ranks_and_dry_runs_slurm(tiny, tmp_path):
    out = tmp_path / "out"
    listed = last_json(minitron(*search_args(tiny, out, "search.list_only=true")))
    assert len(listed["candidates"]) == 3 and listed["enumerated"] >= 3

    # a run that stops after one candidate (as a crash would), then the full run
    first = last_json(minitron(*search_args(tiny, out, "search.top_k=1", "search.stop_after=1")))
    assert first["status"] == "stopped"
    done = [p.parent.name for p in (out / "candidates").glob("*/result.json")]
    assert len(done) == 1
    before = json.loads((out / "candidates" / done[0] / "result.json").read_text())

    result = last_json(minitron(*search_args(tiny, out, "search.top_k=1")))
    assert result["status"] == "done" and result["scored"] == 3 and result["retrained"] == 1
    after = json.loads((out / "candidates" / done[0] / "result.json").read_text())
    assert after["zero_shot_loss_at"] == before["zero_shot_loss_at"]  # not recomputed
    report = json.loads((out / "report.json").read_text())
    rows = report["candidates"]
    assert rows[0]["name"] == result["winner"]["name"] and rows[0]["retrained_loss"] is not None
    assert [r["zero_shot_loss"] is not None for r in rows] == [True] * 3
    assert all(abs(r["parameters"]["non_embedding"] - 6.5e4) <= 0.15 * 6.5e4 for r in rows)
    winner = checkpoint.read_arch(out / "winner")
    assert candidate_name(winner) == result["winner"]["name"]
    assert (out / "loss_vs_params.png").stat().st_size > 0 and "| rank |" in (out / "report.md").read_text()

    # slurm: the retrained candidate is cached; the next one by zero-shot loss gets an sbatch line
    proc = minitron(*search_args(tiny, out, "search.top_k=2", "search.launcher=slurm", "search.dry_run=true"))
    sbatch = [line for line in proc.stdout.splitlines() if line.startswith("sbatch ")]
    assert len(sbatch) == 1 and "launchers/distill.sh" in sbatch[0] and "train.steps=2" in sbatch[0]
    second = rows[1]["name"]
    assert f"student={out / 'candidates' / second / 'pruned'}" in sbatch[0]
    assert last_json(proc)["status"] == "retraining" and last_json(proc)["jobs"] == [second]


def imported_teacher(arch, root: Path) -> None:
    """A tiny teacher of `arch` imported at root/teacher, and the calib, train and valid texts
    `search_args` reads from `root`."""
    write_hf_dir(root / "hf", arch)
    minitron("import", f"hf_path={root / 'hf'}", f"output_dir={root / 'teacher'}")
    for split, shift in (("calib", 0), ("train", 1), ("valid", 2)):
        docs = [" ".join(SENTENCES[(i + shift) % 4:] + SENTENCES[: (i + shift) % 4]) * 3 for i in range(16)]
        (root / f"{split}.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))


@pytest.mark.slow
def test_moe_search_prunes_experts_and_retrains_the_best(tmp_path):
    """A tiny Qwen3-MoE (4 experts of 32, top-2): candidates differ in experts and expert width, the
    best is retrained and its pruned checkpoint is the winner; at tp=2 (retraining with sequence
    parallelism) the search ranks the candidates alike and picks the same winner."""
    teacher = tiny_moe_arch("qwen3_moe")
    imported_teacher(teacher, tmp_path)
    # ~ the teacher with 3 experts of 16: on the grid (experts 2..4, widths 16 and 32) that budget
    # admits a few candidates of different shapes
    budget = teacher.replace(num_moe_experts=3, moe_ffn_hidden_size=16).num_parameters()["total"]
    args = [*search_args(tmp_path, tmp_path / "out", "search.top_k=1", "search.space.expert_multiple=1",
                         "search.space.moe_ffn_multiple=16", "search.space.choices.num_layers=[4]",
                         "search.space.choices.hidden_size=[64]", "search.space.choices.num_attention_heads=[4]")]
    args = [a for a in args if not a.startswith("budget.")] + [f"budget.params={budget}", "budget.tolerance=0.1"]
    result = last_json(minitron(*args))
    assert result["status"] == "done" and result["retrained"] == 1
    rows = json.loads((tmp_path / "out" / "report.json").read_text())["candidates"]
    assert len({(r["arch"]["num_moe_experts"], r["arch"]["moe_ffn_hidden_size"]) for r in rows}) == len(rows) > 1
    assert all("ffn_hidden_size" not in r["arch"] and "active" in r["parameters"] for r in rows)
    winner = checkpoint.read_arch(tmp_path / "out" / "winner")
    assert candidate_name(winner) == result["winner"]["name"] and winner.is_moe
    assert winner.num_moe_experts < 4 or winner.moe_ffn_hidden_size < 32
    assert "| experts | expert ffn |" in (tmp_path / "out" / "report.md").read_text()

    at_tp2 = last_json(minitron(*[a.replace(str(tmp_path / "out"), str(tmp_path / "tp2")) for a in args], "tp=2",
                                nproc=2))
    assert at_tp2["winner"]["name"] == result["winner"]["name"] and at_tp2["retrained"] == 1
    rows_tp2 = json.loads((tmp_path / "tp2" / "report.json").read_text())["candidates"]
    assert [r["name"] for r in rows_tp2] == [r["name"] for r in rows]
    for ours, ref in zip(rows_tp2, rows):
        for key in ("zero_shot_loss", "retrained_loss"):
            assert ours[key] == (ref[key] and pytest.approx(ref[key], rel=1e-4)), (ours["name"], key)


def test_the_retraining_warm_up_follows_retrain_steps_unless_set():
    """The search leaves the retraining's warm-up unset: a tenth of search.retrain_steps, so a short
    retraining is not refused for the distill stage's 10 warm-up steps; a value set is kept."""
    from hydra import compose

    from nemo_minitron.cli.compose import hydra_conf, typed
    from nemo_minitron.search.stage import SearchConfig, _retraining_train

    with hydra_conf():
        for retrain_steps, warmup, expected in ((5, None, 0), (100, None, 10), (100, 3, 3)):
            overrides = [f"search.retrain_steps={retrain_steps}"]
            overrides += [] if warmup is None else [f"distill.optim.warmup_steps={warmup}"]
            cfg = typed(SearchConfig, compose(config_name="search", overrides=overrides))
            steps = _retraining_train(cfg).steps
            assert (steps, cfg.distill.optim.warmup_for(steps)) == (retrain_steps, expected)
            cfg.distill.optim.validate(steps)


def test_retraining_settings_are_checked_before_any_candidate_is_pruned(tiny_teacher_source, tmp_path):
    """A warm-up longer than search.retrain_steps (or a sequence TP cannot split) is refused before
    the zero-shot prunes, naming the keys, and the output directory is not touched."""
    from nemo_minitron import UserError, parallel
    from nemo_minitron.search.space import Budget
    from nemo_minitron.search.stage import SearchConfig, SearchSettings, search_architecture

    cfg = SearchConfig(checkpoint=str(tiny_teacher_source / "teacher"), output_dir=str(tmp_path / "out"),
                       budget=Budget(non_embedding_params=6.5e4, tolerance=0.15),
                       search=SearchSettings(top_k=3, retrain_steps=5))
    cfg.distill.optim.warmup_steps = 10
    try:
        with pytest.raises(UserError, match=r"retraining \(distill\.\* keys, train\.steps = search\.retrain_steps=5\): "
                                            r"optim\.warmup_steps=10 must be below train\.steps=5"):
            search_architecture(cfg)
    finally:
        parallel.destroy()
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_hybrid_search_prunes_mamba_heads_and_channels(tmp_path):
    """A tiny Nemotron-H (Mamba, attention, MLP, Mamba layers; 8 Mamba heads of 12 in 2 groups):
    candidates differ in Mamba heads and head channels, keep the teacher's pattern, and the best is
    retrained and becomes the winner."""
    teacher = tiny_arch(tie=False, family="nemotron_h")
    imported_teacher(teacher, tmp_path)
    budget = teacher.replace(mamba_num_heads=6, mamba_head_dim=8).num_parameters()["total"]
    args = [*search_args(tmp_path, tmp_path / "out", "search.top_k=1", "search.space.mamba_head_dim_multiple=4",
                         "search.space.choices.hidden_size=[64]", "search.space.choices.ffn_hidden_size=[96]",
                         "search.space.choices.num_attention_heads=[4]")]
    args = [a for a in args if not a.startswith("budget.")] + [f"budget.params={budget}", "budget.tolerance=0.05"]
    result = last_json(minitron(*args))
    assert result["status"] == "done" and result["retrained"] == 1
    rows = json.loads((tmp_path / "out" / "report.json").read_text())["candidates"]
    assert len({(r["arch"]["mamba_num_heads"], r["arch"]["mamba_head_dim"]) for r in rows}) == len(rows) > 1
    winner = checkpoint.read_arch(tmp_path / "out" / "winner")
    assert candidate_name(winner) == result["winner"]["name"] and winner.hybrid_pattern == teacher.hybrid_pattern
    assert (winner.mamba_num_heads, winner.mamba_head_dim) != (8, 12)
