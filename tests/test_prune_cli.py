"""`minitron prune`: pruned checkpoint + report + importance.pt, reuse of saved scores for another
target, the same result at TP=2 x PP=2 under torchrun as at TP=1, one-line errors."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from distributed import run_distributed
from nemo_minitron import checkpoint
from nemo_minitron.importance import ImportanceScores
from commands import last_json, minitron
from shared import copy_tiny_teacher
from tiny import global_weights, tiny_arch, write_hf_dir, write_sentence_docs

TARGET = ["target.num_layers=2", "target.hidden_size=48", "target.ffn_hidden_size=64", "target.num_attention_heads=2"]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory, tiny_teacher_source) -> Path:
    return copy_tiny_teacher(tiny_teacher_source, tmp_path_factory.mktemp("prune_cli"))


@pytest.fixture(scope="module")
def calib(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("calib") / "calib.jsonl"
    return write_sentence_docs(path, 16)


def prune_args(teacher: Path, calib: Path, out: Path, *extra: str) -> list[str]:
    return ["prune", f"checkpoint={teacher}", f"output_dir={out}", f"calib.data={calib}", "calib.num_samples=16",
            "calib.seq_len=16", "calib.micro_batch_size=2", "loss_samples=4", *extra]


@pytest.mark.slow
def test_prune_writes_checkpoint_report_and_reuses_scores(teacher, calib, tmp_path):
    first = last_json(minitron(*prune_args(teacher, calib, tmp_path / "a", *TARGET)))
    out = tmp_path / "a"
    arch = checkpoint.read_arch(out)
    assert (arch.num_layers, arch.hidden_size, arch.ffn_hidden_size, arch.num_attention_heads) == (2, 48, 64, 2)
    assert first["parameters"] == arch.num_parameters() and not first["importance"]["reused"]
    assert first["importance"]["tokens"] == 16 * 16 and first["importance"]["tokens_per_s"] > 0
    for name in ("importance.pt", "report.json", "report.md", "layer_importance.png", "head_importance.png"):
        assert (out / name).is_file(), name
    report = json.loads((out / "report.json").read_text())
    assert report["depth"]["method"] == "contiguous" and len(report["depth"]["dropped_layers"]) == 2
    assert len(report["depth"]["block_losses"]["2"]) == 3
    assert len(report["depth"]["layer_scores"]["block_importance"]) == 4
    assert report["architecture"]["student"]["parameters"] == arch.num_parameters()
    assert "| hidden_size | 64 | 48 |" in (out / "report.md").read_text()
    assert checkpoint.read_metadata(out)["dropped_layers"] == first["dropped_layers"]

    # the pruned checkpoint is a normal checkpoint: `minitron eval` runs on it
    ppl = last_json(minitron("eval", f"checkpoint={out}", f"data={calib}", "seq_len=16"))
    assert 1 < ppl["perplexity"] < 1e4

    # another target from the saved scores: nothing recomputed, the same scores travel along
    second = last_json(minitron(*prune_args(teacher, calib, tmp_path / "b", "target.ffn_hidden_size=32",
                                            "depth.method=loss", "target.num_layers=3", f"importance_from={out}")))
    assert second["importance"]["reused"] and second["dropped_layers"] != []
    a, b = ImportanceScores.load(out), ImportanceScores.load(tmp_path / "b")
    assert torch.equal(a.neurons, b.neurons) and "loss" in b.layers and 2 in b.blocks

    # re-running into the same output with another target is refused, naming the keys; with
    # overwrite=true it reuses its importance.pt, and other aggregation settings recompute
    refused = minitron(*prune_args(teacher, calib, out, "target.num_query_groups=1"), check=False)
    assert refused.returncode == 2 and "target.num_query_groups: None -> 1" in refused.stderr.splitlines()[-1]
    assert checkpoint.read_arch(out) == arch
    again = last_json(minitron(*prune_args(teacher, calib, out, "target.num_query_groups=1", "overwrite=true")))
    assert again["importance"]["reused"] and checkpoint.read_arch(out).num_query_groups == 1
    other = last_json(minitron(*prune_args(teacher, calib, out, "target.num_query_groups=1", "aggregation.batch=mean",
                                           "overwrite=true")))
    assert not other["importance"]["reused"]


@pytest.mark.slow
def test_scores_are_reused_across_output_dirs_from_the_cache(teacher, calib, tmp_path):
    """A prune of the same teacher content with the same calibration and importance settings into a
    new directory takes the scores from the cache (with the depth scores the first one added);
    a copy of the teacher is the same teacher; other settings, or scores_cache=false, recompute."""
    first = last_json(minitron(*prune_args(teacher, calib, tmp_path / "a", *TARGET, "aggregation.seq=l2")))
    second = last_json(minitron(*prune_args(teacher, calib, tmp_path / "b", "target.ffn_hidden_size=32",
                                            "target.num_layers=2", "aggregation.seq=l2")))
    assert not first["importance"]["reused"] and second["importance"]["reused"]
    a, b = ImportanceScores.load(tmp_path / "a"), ImportanceScores.load(tmp_path / "b")
    assert torch.equal(a.neurons, b.neurons) and torch.equal(a.blocks[2], b.blocks[2])
    copy = tmp_path / "teacher-copy"
    shutil.copytree(teacher, copy)
    assert last_json(minitron(*prune_args(copy, calib, tmp_path / "c", *TARGET, "aggregation.seq=l2")))[
        "importance"]["reused"]
    off = last_json(minitron(*prune_args(teacher, calib, tmp_path / "d", *TARGET, "aggregation.seq=l2",
                                         "scores_cache=false")))
    assert not off["importance"]["reused"]
    cache = Path(os.environ["NEMO_MINITRON_SCORES_CACHE"])
    for file in cache.glob("*.pt"):
        file.write_bytes(b"damaged")
    damaged = minitron(*prune_args(teacher, calib, tmp_path / "e", *TARGET, "aggregation.seq=l2"))
    assert not last_json(damaged)["importance"]["reused"] and "is unreadable (" in damaged.stderr


@pytest.mark.slow
def test_prune_at_tp2_pp2_equals_tp1(teacher, calib, tmp_path):
    args = [*TARGET, "depth.method=loss"]
    minitron(*prune_args(teacher, calib, tmp_path / "tp1", *args))
    minitron(*prune_args(teacher, calib, tmp_path / "tp2pp2", *args, "tp=2", "pp=2"), nproc=4)
    tp1, tp2pp2 = (ImportanceScores.load(tmp_path / name) for name in ("tp1", "tp2pp2"))
    for name in ("hidden", "heads", "neurons"):
        torch.testing.assert_close(getattr(tp2pp2, name), getattr(tp1, name), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(tp2pp2.layers["loss"], tp1.layers["loss"], rtol=1e-4, atol=1e-5)
    [(a, b)] = run_distributed(global_weights, world_size=1, args=(tmp_path / "tp1", tmp_path / "tp2pp2"))
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def prune_in_process(teacher: Path, calib: Path, out: Path, changes: dict) -> tuple[dict, dict]:
    """`prune_checkpoint` with the CLI tests' calibration settings and `changes`: its global weights
    and report."""
    from nemo_minitron.models import bridge
    from nemo_minitron.pruning.stage import PruneConfig, prune_checkpoint
    from nemo_minitron.stage_config import updated

    base = {"checkpoint": str(teacher), "output_dir": str(out), "loss_samples": 4, "report_loss": False,
            "scores_cache": False, "target": {"num_layers": 2, "ffn_hidden_size": 64},
            "calib": {"data": str(calib), "seq_len": 16, "micro_batch_size": 2},
            "reconstruct": True, "reconstruct_depth": True}
    prune_checkpoint(updated(updated(PruneConfig(), base), changes))
    weights = bridge.gather_global(checkpoint.load_checkpoint(out))
    return weights, json.loads((out / "report.json").read_text())


def test_the_refit_draws_its_own_calibration_windows(teacher, calib, tmp_path):
    """reconstruct_samples=n refits on the draw of n windows that calib.num_samples=n would take:
    with the same kept neurons and layers (importance_from), a prune whose importance saw 16 windows
    and whose refit saw 8 equals, bit for bit, the prune that used 8 for both; null is the
    importance's own windows; another count refits to other weights."""
    runs = {"8": {"calib": {"num_samples": 8}},
            "16, refit 8": {"calib": {"num_samples": 16}, "reconstruct_samples": 8},
            "16, refit null": {"calib": {"num_samples": 16}},
            "16, refit 16": {"calib": {"num_samples": 16}, "reconstruct_samples": 16}}
    results = {}
    for name, changes in runs.items():
        reuse = {} if name == "8" else {"importance_from": str(tmp_path / "8")}
        [results[name]] = run_distributed(prune_in_process, world_size=1,
                                          args=(teacher, calib, tmp_path / name, {**changes, **reuse}))
    windows = {name: report["reconstruction"]["windows"] for name, (_, report) in results.items()}
    assert windows == {"8": 8, "16, refit 8": 8, "16, refit null": 16, "16, refit 16": 16}
    assert {report["depth"]["dropped_layers"] == results["8"][1]["depth"]["dropped_layers"]
            for _, report in results.values()} == {True}
    weights = {name: w for name, (w, _) in results.items()}
    for a, b in (("8", "16, refit 8"), ("16, refit null", "16, refit 16")):
        assert weights[a].keys() == weights[b].keys()
        for key in weights[a]:
            assert torch.equal(weights[a][key], weights[b][key]), (a, b, key)
    refit = [key for key in weights["8"] if key.endswith("linear_fc2.weight")]
    assert refit and all(not torch.equal(weights["8"][key], weights["16, refit 16"][key]) for key in refit)


def test_the_report_shows_each_depth_bridges_check(teacher, calib, tmp_path):
    """reconstruct_depth: report.json holds each bridge's calibration losses with and without it,
    and report.md the same table."""
    [(_, report)] = run_distributed(prune_in_process, world_size=1,
                                    args=(teacher, calib, tmp_path / "out", {"target": {"drop_layers": [1, 2]}}))
    bridges = report["reconstruction"]["bridges"]
    [check] = bridges["checks"]
    assert bridges["windows"] == 4 and check["layer"] == 0 and check["dropped"] == [1, 2]
    assert check["kept"] == (check["loss_without"] >= check["loss_with"])
    row = (f"| 0 | 1-2 | {check['loss_with']:.4f} | {check['loss_without']:.4f} | "
           f"{'yes' if check['kept'] else 'no'} |")
    markdown = (tmp_path / "out" / "report.md").read_text()
    assert "## Depth bridges (LM loss on 4 calibration windows)" in markdown and row in markdown


@pytest.mark.parametrize("extra,message", [
    (["target.num_attention_heads=3"], "target.num_attention_heads=3 is not a multiple of target.num_query_groups=2"),
    (["target.num_layers=2", "importance=random", "depth.method=block_importance"],
     "depth.method=block_importance needs activation scores"),
    (["importance_from=/nonexistent"], "no importance scores at /nonexistent"),
])
def test_prune_errors_are_one_line(teacher, calib, tmp_path, extra, message):
    proc = minitron(*prune_args(teacher, calib, tmp_path / "x", *extra), check=False)
    assert proc.returncode == 2 and f"error: {message}" in proc.stderr, proc.stderr[-2000:]


def test_plan_only_counts_without_weights(teacher, tmp_path):
    result = last_json(minitron("prune", f"checkpoint={teacher}", f"output_dir={tmp_path / 'none'}", "plan_only=true",
                                "target.ffn_hidden_size=48"))
    assert result["student"]["parameters"] == tiny_arch(tie=True, ffn_hidden_size=48).num_parameters()
    assert not (tmp_path / "none").exists()


@pytest.mark.slow
def test_nemotron_import_prune_export_matches_transformers(calib, tmp_path):
    """Nemotron-4 end to end at a tiny size: HF import -> prune (width, heads, depth) -> HF export,
    and the exported model's perplexity in transformers equals `minitron eval` on the checkpoint."""
    from tiny import reference_perplexity

    write_hf_dir(tmp_path / "hf", tiny_arch(tie=False, family="nemotron"))
    minitron("import", f"hf_path={tmp_path / 'hf'}", f"output_dir={tmp_path / 'teacher'}")
    minitron(*prune_args(tmp_path / "teacher", calib, tmp_path / "pruned", *TARGET))
    arch = checkpoint.read_arch(tmp_path / "pruned")
    assert (arch.family, arch.normalization, arch.activation, arch.rotary_percent) == (
        "nemotron", "LayerNorm", "squared_relu", 0.5)
    minitron("export-hf", f"checkpoint={tmp_path / 'pruned'}", f"output_dir={tmp_path / 'pruned_hf'}")
    config = json.loads((tmp_path / "pruned_hf" / "config.json").read_text())
    assert config["model_type"] == "nemotron" and config["hidden_size"] == 48 and config["num_hidden_layers"] == 2
    ppl = last_json(minitron("eval", f"checkpoint={tmp_path / 'pruned'}", f"data={calib}", "seq_len=16"))
    assert ppl["perplexity"] == pytest.approx(reference_perplexity(tmp_path / "pruned_hf", calib, 16), rel=1e-5)
