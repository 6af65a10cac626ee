"""`minitron search`: grid enumeration under budgets (closed-form counts) and a resumable search
on a tiny teacher (zero-shot scoring, local retraining, slurm dry-run)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nemo_minitron import checkpoint
from nemo_minitron.prune import PUBLISHED_TEACHERS, count_from_shapes
from nemo_minitron.search import Budget, SearchSpace, candidate_name, enumerate_candidates
from commands import last_json, minitron
from tiny import SENTENCES, tiny_arch, write_hf_dir

LLAMA = PUBLISHED_TEACHERS["llama-3.1-8b"]


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


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("search")
    write_hf_dir(root / "hf", tiny_arch(tie=True))
    minitron("import", f"hf_path={root / 'hf'}", f"output_dir={root / 'teacher'}")
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
