"""The `minitron` console script: import -> export-hf -> import round trip, eval at TP=1/TP=2
against a transformers reference, and one-line errors for bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from safetensors.torch import load_file

from commands import last_json, minitron
from distributed import run_distributed
from tiny import (global_weights, reference_perplexity, short_correction, tiny_arch, user_corpus, write_hf_dir,
                  write_sentence_docs)

@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("hf")
    write_hf_dir(path, tiny_arch(tie=False))
    return path


@pytest.fixture(scope="module")
def imported(hf_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ckpt") / "teacher"
    result = last_json(minitron("import", f"hf_path={hf_dir}", f"output_dir={out}"))
    assert result["total"] == tiny_arch(tie=False).num_parameters()["total"]
    return out


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "heldout.jsonl"
    return write_sentence_docs(path, 12)


@pytest.mark.slow
def test_export_loads_in_transformers_and_reimports_exactly(hf_dir, imported, tmp_path):
    exported = tmp_path / "export"
    minitron("export-hf", f"checkpoint={imported}", f"output_dir={exported}")
    model = transformers.AutoModelForCausalLM.from_pretrained(str(exported)).eval()
    original = transformers.AutoModelForCausalLM.from_pretrained(str(hf_dir)).eval()
    tokens = torch.randint(0, 320, (2, 16), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(model(tokens).logits, original(tokens).logits, rtol=0, atol=0)
    tok = transformers.AutoTokenizer.from_pretrained(str(exported))
    assert tok("a single man").input_ids == transformers.AutoTokenizer.from_pretrained(str(hf_dir))("a single man").input_ids
    first, second = load_file(str(hf_dir / "model.safetensors")), load_file(str(exported / "model.safetensors"))
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    # import -> export -> import: the re-imported checkpoint exports identical tensors again
    again = tmp_path / "again"
    minitron("import", f"hf_path={exported}", f"output_dir={again}")
    minitron("export-hf", f"checkpoint={again}", f"output_dir={tmp_path / 'export2'}")
    third = load_file(str(tmp_path / "export2" / "model.safetensors"))
    assert all(torch.equal(first[k], third[k]) for k in first)


def test_a_token_cap_spreads_the_windows_over_the_whole_text():
    from nemo_minitron.eval.perplexity import windows_from_stream

    stream = np.arange(1001)  # 10 windows of 100: window i predicts tokens 100 i + 1 .. 100 i + 100
    assert windows_from_stream(stream, 100).shape == (10, 101)
    assert torch.equal(windows_from_stream(stream, 100, max_tokens=10_000), windows_from_stream(stream, 100))
    capped = windows_from_stream(stream, 100, max_tokens=400)
    assert capped[:, 0].tolist() == [0, 200, 500, 700]  # floor(i * 10 / 4) windows in, not the first 4
    assert torch.equal(capped[:, 1:] - capped[:, :-1], torch.ones(4, 100, dtype=torch.int64))
    assert windows_from_stream(stream, 100, max_tokens=1)[:, 0].tolist() == [0]


@pytest.mark.slow
def test_eval_matches_transformers_at_tp1_and_tp2(hf_dir, imported, text_file):
    args = ("eval", f"checkpoint={imported}", f"data={text_file}", "seq_len=32", "micro_batch_size=2")
    tp1 = last_json(minitron(*args))
    tp2 = last_json(minitron(*args, "tp=2", nproc=2))
    pp2 = last_json(minitron(*args, "pp=2", nproc=2))
    expected = reference_perplexity(hf_dir, text_file, 32)
    assert tp1["tokens"] == tp2["tokens"] == pp2["tokens"] > 0
    assert tp1["perplexity"] == pytest.approx(expected, rel=1e-5)
    assert tp2["perplexity"] == pytest.approx(expected, rel=1e-5)
    assert pp2["perplexity"] == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize(
    "args,message",
    [
        (("eval", "checkpoint=/nonexistent", "data=x.txt"), "checkpoint=/nonexistent does not exist"),
        (("eval", "data=x.txt"), "missing required key: set checkpoint="),
        (("import", "hf_path=/nonexistent", "output_dir=/tmp/x"), "hf_path=/nonexistent has no config.json"),
        (("import", "model=nope", "output_dir=/tmp/x"), "model=nope is not a built-in model"),
        (("eval", "checkpoint=/tmp/café", "data=x.txt"),
         """cannot parse 'checkpoint=/tmp/café': quote a value with spaces, non-ASCII letters or other special """
         """characters, e.g. checkpoint="/tmp/café" """),
        (("import", "hf_path=HF", "output_dir=/tmp/x", "tp=2"), "tp=2 x pp=1 does not divide the world size 1"),
        (("pipeline", "--config-name", "recipes/mn_minitron_8b"), "no teacher: set teacher.hf_path=DIR"),
        (("pipeline", "--config-name", "recipes/mn_minitron_8b", "teacher.hf_path=/m"),
         "no distillation data: set corpus.user_paths="),
    ],
)
def test_bad_input_is_one_clear_line(args, message, hf_dir):
    proc = minitron(*[a.replace("HF", str(hf_dir)) for a in args], check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == f"error: {proc.stderr.strip().splitlines()[-1][7:]}"
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
    # megatron's warnings about absent Transformer Engine / Apex: one line of ours, not eight of its
    assert "UserWarning" not in proc.stderr and proc.stderr.count("Transformer Engine and Apex are not installed") <= 1


def test_wrong_architecture_and_vocab_mismatch(tmp_path, hf_dir):
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 2}))
    proc = minitron("import", f"hf_path={gpt2}", f"output_dir={tmp_path / 'o'}", check=False)
    assert proc.returncode == 2 and "unsupported architecture model_type='gpt2'" in proc.stderr
    small_vocab = tmp_path / "small_vocab"
    write_hf_dir(small_vocab, tiny_arch(vocab_size=300))
    tiny_tok = transformers.AutoTokenizer.from_pretrained(str(hf_dir))  # 320 tokens > vocab 300
    tiny_tok.save_pretrained(str(small_vocab))
    proc = minitron("import", f"hf_path={small_vocab}", f"output_dir={tmp_path / 'o'}", check=False)
    assert proc.returncode == 2 and "tokenizer" in proc.stderr and "vocab_size is 300" in proc.stderr


@pytest.mark.slow
def test_tp_must_divide_query_groups(hf_dir, imported, text_file):
    # tiny_arch has 2 query groups; 4 processes at tp=4 cannot split them
    proc = minitron("eval", f"checkpoint={imported}", f"data={text_file}", "seq_len=64", "tp=4", nproc=4, check=False)
    assert proc.returncode != 0 and "error: tp=4 does not divide num_query_groups=2" in proc.stderr
    # torchrun reports the failed children itself; our processes print one line, no traceback
    assert "nemo_minitron/" not in proc.stderr


@pytest.mark.slow
def test_pipeline_on_the_embedded_default_resumes(tmp_path):
    """The README's main job at a tiny size: SmolLM2 from GGUF, the Debian corpus, prune, distill,
    export, evaluate. Every stage leaves its output; the teacher's held-out perplexity equals
    transformers' on the same GGUF weights; a re-run skips the finished stages."""
    from nemo_minitron import checkpoint
    from nemo_minitron.models.gguf_import import embedded_gguf_path, load_gguf_llama
    from nemo_minitron.models.hf_config import arch_from_hf
    from nemo_minitron.models.hf_io import write_hf_directory
    from nemo_minitron.stage_config import auto_dtype

    work = tmp_path / "run"
    args = ("pipeline", f"work_dir={work}", "eval.seq_len=128", "eval.max_tokens=512", "prune.calib.num_samples=8",
            "prune.calib.seq_len=128", "prune.reconstruct_samples=8", "prune.loss_samples=2", "distill.train.steps=2",
            "distill.train.seq_length=64", "distill.optim.warmup_steps=1", "distill.train.save_interval=0",
            *short_correction(64))
    first = minitron(*args)
    summary = last_json(first)
    assert list(summary["stage_seconds"]) == ["import", "corpus", "teacher_correct", "prune", "distill", "export_hf",
                                              "eval_teacher_uncorrected", "eval_teacher", "eval_pruned",
                                              "eval_student"]
    assert summary["teacher"]["parameters"]["total"] == 134_515_008
    # the default target is ~50% of the teacher's non-embedding parameters
    ratio = summary["student"]["parameters"]["non_embedding"] / summary["teacher"]["parameters"]["non_embedding"]
    assert 0.45 < ratio < 0.55
    assert summary["distillation_tokens"] == 2 * 8 * 64
    # training in bf16 where this CPU computes it natively, perplexity in fp32 (as transformers below)
    assert summary["dtype"] == {"distill": auto_dtype(), "eval": "float32"}
    assert f"{auto_dtype()} / float32" in first.stdout
    assert "held-out perplexity" in first.stdout and (work / "report.md").is_file()
    for plot in ("perplexity.png", "distillation.png"):
        assert (work / plot).stat().st_size > 1000, plot
        assert f"]({plot})" in (work / "report.md").read_text()
    assert json.loads((work / "results.json").read_text()) == summary
    for ckpt in ("teacher", "teacher_corrected/final", "pruned", "distill/final"):
        assert checkpoint.is_complete(work / ckpt), ckpt
    assert (work / "pruned" / "report.json").is_file()
    transformers.AutoModelForCausalLM.from_pretrained(str(work / "student_hf"))

    gguf = load_gguf_llama(embedded_gguf_path())
    hf_dir = write_hf_directory(arch_from_hf(gguf.config), gguf.state_dict, gguf.tokenizer, tmp_path / "hf")
    expected = reference_perplexity(hf_dir, work / "corpus" / "heldout.jsonl", 128, max_windows=4)
    imported = summary["teacher"]["uncorrected"]["heldout_perplexity"]
    assert imported == pytest.approx(expected, rel=1e-4)
    assert 5 < expected < 200  # a real language model on real English text
    assert summary["pruned"]["heldout_perplexity"] > max(imported, summary["teacher"]["heldout_perplexity"])
    # the main job refits after pruning: every refit consumer's calibration error fell
    errors = json.loads((work / "pruned" / "report.json").read_text())["reconstruction"]["errors"]
    assert all(after < before for record in errors.values() for before, after in zip(record["before"], record["after"]))

    again = last_json(minitron(*args))
    assert again["stage_seconds"]["prune"] == summary["stage_seconds"]["prune"]  # not re-run: time kept
    assert again["student"]["heldout_perplexity"] == summary["student"]["heldout_perplexity"]


@pytest.mark.slow
def test_pipeline_searches_instead_of_pruning(hf_dir, tmp_path):
    """search.enabled=true: the search's winner under the budget is the student the pipeline distils,
    exports and evaluates (the tiny teacher on a corpus of the user's file alone)."""
    from nemo_minitron import checkpoint

    work = tmp_path / "searched"
    budget = 6.5e4  # ~60% of the tiny teacher's non-embedding parameters
    result = last_json(minitron(
        "pipeline", f"work_dir={work}", f"teacher.hf_path={hf_dir}", *user_corpus(tmp_path / "docs.jsonl"),
        "teacher_correct.enabled=false", "search.enabled=true", f"search.budget.non_embedding_params={budget}",
        "++search.budget.tolerance=0.15",
        "++search.search.space.hidden_multiple=16", "++search.search.space.ffn_multiple=32",
        "++search.search.space.choices.num_query_groups=[2]", "search.search.max_candidates=2", "search.search.top_k=1",
        "search.search.retrain_steps=1", "search.prune.calib.num_samples=8", "search.prune.calib.seq_len=16",
        "search.prune.loss_samples=2", "search.distill.train.seq_length=16", "search.distill.optim.warmup_steps=0",
        "distill.train.steps=2", "distill.train.seq_length=16", "distill.optim.warmup_steps=1",
        "distill.train.save_interval=0", "eval.seq_len=16", "eval.max_tokens=256"))
    assert "search" in result["stage_seconds"] and "prune" not in result["stage_seconds"]
    assert result["pruned"]["checkpoint"] == str(work / "search" / "winner")
    assert result["student"]["architecture"] == checkpoint.read_arch(work / "search" / "winner").shape()
    ratio = result["student"]["parameters"]["non_embedding"] / budget
    assert 0.85 <= ratio <= 1.15  # search.budget.tolerance
    assert "search/loss_vs_params.png" in (work / "report.md").read_text()


@pytest.mark.slow
def test_pipeline_distils_from_the_corrected_teacher_and_reports_both(hf_dir, tmp_path):
    """teacher_correct.enabled=true: the student is distilled from the corrected teacher, pruned
    from the teacher as imported (prune_from=corrected: from the corrected one, the run resumed
    with overwrite=true), and the report shows both teachers; the imported one's perplexity
    equals transformers' on the user's HF model (the tiny teacher on a corpus of the user's file
    alone)."""
    work = tmp_path / "corrected"
    pipeline = ["pipeline", f"work_dir={work}", f"teacher.hf_path={hf_dir}", *user_corpus(tmp_path / "docs.jsonl"),
                "teacher_correct.enabled=true", "teacher_correct.train.steps=4", "teacher_correct.train.seq_length=16",
                "teacher_correct.optim.lr=1e-2", "teacher_correct.optim.warmup_steps=0",
                "prune.target.num_layers=2", "prune.target.ffn_hidden_size=64", "prune.calib.num_samples=8",
                "prune.calib.seq_len=16", "prune.reconstruct_samples=8", "prune.loss_samples=2",
                "distill.train.steps=1", "distill.train.seq_length=16", "distill.optim.warmup_steps=0",
                "distill.train.save_interval=0", "eval.seq_len=16", "eval.max_tokens=256"]
    result = last_json(minitron(*pipeline))
    assert list(result["stage_seconds"]) == ["import", "corpus", "teacher_correct", "prune", "distill", "export_hf",
                                             "eval_teacher_uncorrected", "eval_teacher", "eval_pruned", "eval_student"]
    imported, corrected = work / "teacher", work / "teacher_corrected" / "final"
    assert result["teacher"]["checkpoint"] == str(corrected)
    assert result["teacher"]["uncorrected"]["checkpoint"] == str(imported)

    def sources() -> tuple[Path, Path]:
        """What the pruned model was pruned from and the student distilled from, as recorded."""
        return tuple(Path(json.loads((work / stage / "metadata.json").read_text())["teacher"]).resolve()
                     for stage in ("pruned", "distill/final"))

    def embeddings_of(*paths: Path) -> list[torch.Tensor]:  # kept whole by a prune that keeps the hidden size
        return [w["embedding.word_embeddings.weight"] for w in run_distributed(global_weights, world_size=1,
                                                                                  args=paths)[0]]

    assert sources() == (imported.resolve(), corrected.resolve())
    pruned, before, after = embeddings_of(work / "pruned", imported, corrected)
    assert torch.equal(pruned, before) and not torch.equal(pruned, after)
    expected = reference_perplexity(hf_dir, work / "corpus" / "heldout.jsonl", 16, max_windows=16)
    uncorrected = result["teacher"]["uncorrected"]["heldout_perplexity"]
    assert uncorrected == pytest.approx(expected, rel=1e-4)
    assert result["teacher"]["heldout_perplexity"] < uncorrected  # fine-tuned on the same sentences
    row = next(line for line in (work / "report.md").read_text().splitlines() if "before correction" in line)
    assert row.split() == ["teacher", "before", "correction", f"{uncorrected:.2f}"]

    minitron(*pipeline, "prune_from=corrected", "overwrite=true")
    assert sources() == (corrected.resolve(), corrected.resolve())
    pruned, after = embeddings_of(work / "pruned", corrected)
    assert torch.equal(pruned, after)


@pytest.mark.parametrize(("overrides", "message"), [
    (["distill.optim.warmup_steps=200"], "the distill block (distill.* keys): optim.warmup_steps=200 must be below "
                                         "train.steps=64"),
    (["teacher_correct.optim.warmup_steps=50"],
     "the teacher_correct block (teacher_correct.* keys): optim.warmup_steps=50 must be below train.steps=12"),
    (["search.enabled=true", "search.search.retrain_steps=1", "search.distill.optim.warmup_steps=5"],
     "the search block (search.* keys): the retraining (distill.* keys, train.steps = search.retrain_steps=1): "
     "optim.warmup_steps=5 must be below train.steps=1"),
    (["prune_from=teacher"], "prune_from=teacher is not one of imported, corrected"),
], ids=["distill", "teacher-correct", "search-retraining", "prune-from"])
def test_a_late_stage_mistake_stops_the_pipeline_before_its_first_stage(overrides, message, tmp_path):
    proc = minitron("pipeline", f"work_dir={tmp_path / 'run'}", *overrides, check=False)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1] == f"error: {message}", proc.stderr[-2000:]
    assert not (tmp_path / "run").exists()  # nothing imported, claimed or built


@pytest.mark.parametrize(("overrides", "top", "expected"), [
    ([], None, {"distill": "auto", "teacher_correct": "auto", "prune": "float32", "eval": "float32"}),
    (["dtype=float16"], "float16", dict.fromkeys(("distill", "teacher_correct", "prune", "eval"), "float16")),
    (["distill.dtype=float32", "eval.dtype=bfloat16"], None,
     {"distill": "float32", "teacher_correct": "auto", "prune": "float32", "eval": "bfloat16"}),
])
def test_pipeline_dtype_is_each_stages_own_unless_set(overrides, top, expected):
    """dtype=null leaves each stage its own (training auto, measuring float32); a block changes one
    stage, a top-level dtype every stage."""
    from hydra import compose

    from nemo_minitron.cli.compose import hydra_conf, typed
    from nemo_minitron.pipeline import PipelineConfig
    from nemo_minitron.stage_config import auto_dtype

    with hydra_conf():
        cfg = typed(PipelineConfig, compose(config_name="pipeline", overrides=overrides))
    assert cfg.dtype == top
    assert {stage: getattr(cfg, stage).dtype for stage in expected} == {
        stage: auto_dtype() if dtype == "auto" else dtype for stage, dtype in expected.items()}


def test_pipeline_stops_at_a_stage_interrupted_by_preemption(imported, text_file, tmp_path, monkeypatch):
    """A training stage that checkpointed on SIGUSR1 and returned early ends the pipeline run (the
    requeued job resumes it) instead of running the next stage on a missing final/. The distill
    stage returns what it returns after a pre-emption checkpoint (tests/test_distill.py covers the
    signal itself); import and prune report their output complete."""
    import nemo_minitron.pipeline.run as pipeline_run
    from nemo_minitron.outputs import MARKER_FILE
    from nemo_minitron.distill.stage import DistillConfig
    from nemo_minitron.pipeline import PipelineConfig, run_pipeline
    from nemo_minitron.stage_config import CorpusConfig
    from nemo_minitron.train import TrainConfig

    work = tmp_path / "run"
    for done in ("teacher", "pruned"):
        shutil.copytree(imported, work / done)
    (work / MARKER_FILE).write_text('{"stage": "pipeline"}')  # an earlier run of this pipeline
    called = []
    for finished in ("import_checkpoint", "prune_checkpoint"):
        monkeypatch.setattr(pipeline_run, finished, lambda cfg: {"already_complete": True})
    monkeypatch.setattr(pipeline_run, "distill_checkpoint",
                        lambda cfg: called.append("distill") or {"interrupted": True, "step": 3})
    monkeypatch.setattr(pipeline_run, "export_hf", lambda cfg: called.append("export_hf") or {})
    monkeypatch.setattr(pipeline_run, "evaluate_checkpoint", lambda cfg: called.append("eval") or {})
    result = run_pipeline(PipelineConfig(work_dir=str(work), corpus=CorpusConfig(sources=[], user_paths=[str(text_file)]),
                                         enabled=pipeline_run.OptionalStages(teacher_correct=False),
                                         distill=DistillConfig(train=TrainConfig(steps=40))))
    assert result == {"status": "interrupted", "interrupted": True, "stage": "distill", "work_dir": str(work)}
    assert called == ["distill"] and not (work / "results.json").exists()


def test_harness_tasks_without_lm_eval_say_how_to_install_it(monkeypatch, tmp_path):
    """lm-evaluation-harness is the `eval` extra, not part of the main job's install."""
    import importlib.util
    import sys

    from nemo_minitron.errors import UserError
    from nemo_minitron.eval.stage import EvalConfig, HarnessConfig, evaluate_checkpoint

    monkeypatch.setitem(sys.modules, "lm_eval", None)  # what `import lm_eval` meets where it is not installed
    with pytest.raises(UserError, match=r"harness.tasks needs lm-evaluation-harness 0.4.13.*pip install -e '.\[eval\]'"):
        evaluate_checkpoint(EvalConfig(checkpoint=str(tmp_path), harness=HarnessConfig(tasks=["tiny_mc"])))
    monkeypatch.delitem(sys.modules, "lm_eval")
    if importlib.util.find_spec("lm_eval") is not None:  # and a missing task directory, before the model loads
        with pytest.raises(UserError, match=f"harness.include_path={tmp_path / 'tasks'} is not a directory"):
            evaluate_checkpoint(EvalConfig(checkpoint=str(tmp_path), harness=HarnessConfig(
                tasks=["tiny_mc"], include_path=str(tmp_path / "tasks"))))
