"""Hostile and unlucky input across the stages: each case asserts the exact outcome (exit code, one
`error:` line naming the key or the file, the inputs untouched byte for byte), damaged checkpoints
are reported before any load, a re-run never ignores changed settings, and a run killed with SIGKILL
at random points (inside a save too) leaves no process behind and resumes to the weights of an
uninterrupted run."""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from commands import ENV, last_json, minitron
from distributed import run_distributed
from tiny import global_weights, tiny_arch, write_hf_dir, write_sentence_docs

MAX_POSITIONS = tiny_arch().max_position_embeddings


def snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _damaged(teacher: Path, root: Path) -> dict[str, Path]:
    """Copies of `teacher`, each damaged one way."""
    out = {}
    for name in ("truncated", "deleted", "edited", "missing_field", "bad_json", "bad_tokenizer"):
        out[name] = root / f"ckpt_{name}"
        shutil.copytree(teacher, out[name])
    shard = sorted((out["truncated"] / "weights").glob("*.distcp"))[0]
    shard.write_bytes(shard.read_bytes()[:-100])
    sorted((out["deleted"] / "weights").glob("*.distcp"))[-1].unlink()
    for name, change in (("edited", lambda c: {**c, "ffn_hidden_size": c["ffn_hidden_size"] // 2}),
                         ("missing_field", lambda c: {k: v for k, v in c.items() if k != "hidden_size"})):
        config = out[name] / "model_config.json"
        config.write_text(json.dumps(change(json.loads(config.read_text()))))
    (out["bad_json"] / "model_config.json").write_text("{\n  num_layers: 4\n")
    (out["bad_tokenizer"] / "tokenizer" / "tokenizer.json").write_text('{"version": "1.0", "truncated')
    return out


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """Everything the hostile commands read: a teacher checkpoint, damaged copies, data files."""
    from nemo_minitron.convert import ImportConfig, import_checkpoint

    root = tmp_path_factory.mktemp("faults")
    write_hf_dir(root / "hf", tiny_arch(tie=True))
    import_checkpoint(ImportConfig(hf_path=str(root / "hf"), output_dir=str(root / "teacher")))
    _damaged(root / "teacher", root)
    write_sentence_docs(root / "docs.jsonl", 12)
    (root / "latin1.txt").write_bytes("first paragraph\n\ncaf\xe9 au lait\n".encode("latin-1"))
    pair = {"prompt": "Say hi.", "chosen_response": "Hi!", "rejected_response": "  "}
    (root / "pairs.jsonl").write_text(json.dumps(pair) + "\n")
    (root / "a_file").write_text("not a directory\n")
    for name, config in (("hf_bad_json", '{"model_type": "llama",'), ("hf_no_sizes", '{"model_type": "llama"}')):
        shutil.copytree(root / "hf", root / name)
        (root / name / "config.json").write_text(config)
    (root / "loop").symlink_to(root / "loop")
    os.mkfifo(root / "fifo")  # what `data=<(cat file)` passes
    (root / "empty.jsonl").write_text("")
    (root / "four_tokens.txt").write_text("The quick")
    (root / "garbage.idx").write_bytes(b"not an index" * 8)
    (root / "garbage.bin").write_bytes(b"\0" * 64)
    return root


# (id, command, exit code, text the single error line must contain). T: the teacher, R: the inputs
# directory, O: a fresh output directory.
HOSTILE = [
    ("eval-seq-beyond-positions", ["eval", "checkpoint=T", "data=R/docs.jsonl", f"seq_len={MAX_POSITIONS + 1}"],
     f"seq_len={MAX_POSITIONS + 1} exceeds the model's max_position_embeddings={MAX_POSITIONS}"),
    ("eval-zero-max-tokens", ["eval", "checkpoint=T", "data=R/docs.jsonl", "max_tokens=0"],
     "max_tokens=0 must be positive"),
    ("eval-negative-micro-batch", ["eval", "checkpoint=T", "data=R/docs.jsonl", "micro_batch_size=-1"],
     "micro_batch_size=-1 must be positive"),
    ("eval-non-utf8-data", ["eval", "checkpoint=T", "data=R/latin1.txt", "seq_len=64"], "R/latin1.txt:3: not UTF-8 text"),
    ("eval-data-from-a-pipe", ["eval", "checkpoint=T", "data=R/fifo", "seq_len=16"],
     "R/fifo is not a regular file (a pipe or process substitution?)"),
    ("eval-fractional-tp", ["eval", "checkpoint=T", "data=R/docs.jsonl", "tp=1.5"],
     "tp: Value '1.5' of type 'float' could not be converted to Integer"),
    ("generate-zero-new-tokens", ["generate", "checkpoint=T", "prompt=hi", "max_new_tokens=0"],
     "max_new_tokens=0 must be positive"),
    ("generate-negative-max-length", ["generate", "checkpoint=T", "prompt=hi", "max_length=-5"],
     "max_length=-5 must be positive"),
    ("prune-fractional-layers", ["prune", "checkpoint=T", "output_dir=O", "target.num_layers=2.5"],
     "target.num_layers: Value '2.5' of type 'float' could not be converted to Integer"),
    ("prune-zero-hidden", ["prune", "checkpoint=T", "output_dir=O", "target.hidden_size=0"],
     "target.hidden_size=0 must be positive"),
    ("prune-calib-beyond-positions", ["prune", "checkpoint=T", "output_dir=O", "calib.data=R/docs.jsonl",
                                      f"calib.seq_len={MAX_POSITIONS * 2}"],
     f"calib.seq_len={MAX_POSITIONS * 2} exceeds the model's max_position_embeddings"),
    ("distill-steps-not-a-number", ["distill", "teacher=T", "student=T", "output_dir=O", "train.steps=abc"],
     "train.steps: Value 'abc' of type 'str' could not be converted to Integer"),
    ("distill-zero-micro-batch", ["distill", "teacher=T", "student=T", "output_dir=O", "data.train=R/docs.jsonl",
                                  "train.steps=2", "train.micro_batch_size=0"], "train.micro_batch_size=0 must be positive"),
    ("distill-negative-lr", ["distill", "teacher=T", "student=T", "output_dir=O", "data.train=R/docs.jsonl",
                             "train.steps=2", "optim.lr=-1"], "optim.lr=-1.0 must be positive"),
    ("distill-unknown-spike-action", ["distill", "teacher=T", "student=T", "output_dir=O", "data.train=R/docs.jsonl",
                                      "train.steps=2", "train.seq_length=32", "train.spike.action=ignore"],
     "train.spike.action='ignore' is not one of skip, stop"),
    ("distill-seq-beyond-positions", ["distill", "teacher=T", "student=T", "output_dir=O", "data.train=R/docs.jsonl",
                                      "train.steps=2", f"train.seq_length={MAX_POSITIONS * 2}"],
     f"train.seq_length={MAX_POSITIONS * 2} exceeds the model's max_position_embeddings"),
    ("distill-empty-data", ["distill", "teacher=T", "student=T", "output_dir=O", "data.train=R/empty.jsonl",
                            "train.steps=2", "train.seq_length=32", "optim.warmup_steps=0"],
     "data.train=R/empty.jsonl holds 0 tokens, fewer than one sequence of train.seq_length=32 + 1"),
    ("distill-data-shorter-than-a-sequence", ["distill", "teacher=T", "student=T", "output_dir=O",
                                              "data.train=R/docs.jsonl", "data.valid=R/four_tokens.txt",
                                              "train.steps=2", "train.seq_length=32", "optim.warmup_steps=0"],
     "data.valid=R/four_tokens.txt holds 6 tokens, fewer than one sequence of train.seq_length=32 + 1"),
    ("teacher-correct-garbage-indexed-data", ["teacher-correct", "teacher=T", "output_dir=O", "data.train=R/garbage",
                                              "train.steps=2", "train.seq_length=32", "optim.warmup_steps=0"],
     "data.train=R/garbage: R/garbage.idx is not a megatron indexed-dataset index (AssertionError: bad header"),
    ("distill-into-current-directory", ["distill", "teacher=T", "student=T", "output_dir=.", "data.train=R/docs.jsonl",
                                        "train.steps=2", "train.seq_length=32", "optim.warmup_steps=0"],
     "output_dir=. is the current directory"),
    ("align-empty-dpo-response", ["align", "method=dpo", "student=T", "output_dir=O", "data.train=R/pairs.jsonl",
                                  "train.steps=1", "train.micro_batch_size=2", "train.global_batch_size=2",
                                  "train.seq_length=64", "optim.warmup_steps=0"],
     "R/pairs.jsonl:1: field 'rejected_response' is empty"),
    ("import-config-not-json", ["import", "hf_path=R/hf_bad_json", "output_dir=O"],
     "hf_path=R/hf_bad_json: R/hf_bad_json/config.json is not valid JSON (Expecting property name"),
    ("import-config-without-sizes", ["import", "hf_path=R/hf_no_sizes", "output_dir=O"],
     "hf_path=R/hf_no_sizes: the llama config lacks num_hidden_layers, hidden_size, intermediate_size, "
     "num_attention_heads, vocab_size"),
    ("import-into-a-symlink-loop", ["import", "hf_path=R/hf", "output_dir=R/loop/teacher"],
     "output_dir=R/loop/teacher cannot be resolved"),
    ("import-under-a-file", ["import", "hf_path=R/hf", "output_dir=R/a_file/teacher"],
     "output_dir=R/a_file/teacher cannot be written: R/a_file is a file"),
    ("export-into-its-input", ["export-hf", "checkpoint=T", "output_dir=T"], "output_dir=T overlaps the input T"),
    ("export-over-a-checkpoint", ["export-hf", "checkpoint=T", "output_dir=R/ckpt_edited"],
     "holds the output of the import stage"),
    ("load-truncated-shard", ["eval", "checkpoint=R/ckpt_truncated", "data=R/docs.jsonl", "seq_len=64"],
     "bytes but was saved with"),
    ("check-deleted-shard", ["check", "checkpoint=R/ckpt_deleted"], ".distcp is missing"),
    ("load-edited-config", ["export-hf", "checkpoint=R/ckpt_edited", "output_dir=O"],
     "R/ckpt_edited/model_config.json implies decoder.layers.mlp.linear_fc1.weight of shape"),
    ("load-config-missing-field", ["eval", "checkpoint=R/ckpt_missing_field", "data=R/docs.jsonl"],
     "R/ckpt_missing_field/model_config.json: model config lacks the keys ['hidden_size']"),
    ("check-bad-tokenizer", ["check", "checkpoint=R/ckpt_bad_tokenizer"],
     "R/ckpt_bad_tokenizer/tokenizer/tokenizer.json is not valid JSON (Unterminated string"),
    ("export-bad-tokenizer", ["export-hf", "checkpoint=R/ckpt_bad_tokenizer", "output_dir=O"],
     "checkpoint=R/ckpt_bad_tokenizer has a damaged tokenizer: R/ckpt_bad_tokenizer/tokenizer/tokenizer.json is not "
     "valid JSON (Unterminated string starting at: line 1 column 20)"),
    ("load-config-bad-json", ["check", "checkpoint=R/ckpt_bad_json"],
     "R/ckpt_bad_json/model_config.json is not valid JSON (Expecting property name enclosed in double quotes: "
     "line 2 column 3)"),
]


@pytest.mark.parametrize("args,message", [case[1:] for case in HOSTILE], ids=[case[0] for case in HOSTILE])
def test_hostile_input_is_one_line_and_touches_nothing(inputs, args, message, tmp_path):
    before = snapshot(inputs)

    def fill(text: str) -> str:
        return (text.replace("=T", f"={inputs / 'teacher'}").replace(" T", f" {inputs / 'teacher'}")
                .replace("R/", f"{inputs}/").replace("=O", f"={tmp_path / 'out'}"))

    proc = minitron(*map(fill, args), check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert lines[-1].startswith("error: ") and fill(message) in lines[-1], lines[-1]
    assert snapshot(inputs) == before
    assert not (tmp_path / "out").exists()


def test_configs_made_in_python_are_range_checked_with_their_full_key():
    from nemo_minitron import DistillConfig, EvalConfig, PruneConfig, UserError
    from nemo_minitron.pruning.spec import PruneSpec
    from nemo_minitron.train import TrainConfig

    with pytest.raises(UserError, match=r"^train.micro_batch_size=0 must be positive$"):
        DistillConfig(train=TrainConfig(steps=5, micro_batch_size=0))
    with pytest.raises(UserError, match=r"^target.ffn_hidden_size=-8 must be positive$"):
        PruneConfig(target=PruneSpec(ffn_hidden_size=-8))
    with pytest.raises(UserError, match=r"^pp=0 must be positive$"):
        EvalConfig(pp=0)
    assert EvalConfig(max_tokens=None).max_tokens is None  # unset is not out of range


def test_check_verifies_a_sound_checkpoint_and_every_load_checks_it(inputs):
    result = last_json(minitron("check", f"checkpoint={inputs / 'teacher'}"))
    assert result["ok"] and result["checksums"] == "sha256" and result["files"] >= 4
    assert result["tensors"] == 8 and result["ffn_hidden_size"] == tiny_arch().ffn_hidden_size
    # one flipped byte keeps the size: only the checksum sees it (and `checksums=false` does not read it)
    from nemo_minitron import verify_checkpoint
    from nemo_minitron.checkpoint import CheckpointError

    flipped = inputs.parent / "flipped"
    shutil.copytree(inputs / "teacher", flipped)
    shard = sorted((flipped / "weights").glob("*.distcp"))[0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 1
    shard.write_bytes(bytes(data))
    assert verify_checkpoint(flipped, checksums=False)["checksums"] == "sizes only"
    with pytest.raises(CheckpointError, match=rf"{shard} differs from what was saved \(SHA-256 mismatch"):
        verify_checkpoint(flipped)


@pytest.mark.slow
def test_rerun_with_other_settings_and_overwrite(inputs, tmp_path):
    """A finished output re-run: same settings do nothing, other settings are refused naming the
    keys, overwrite=true replaces only the stage's own files."""
    teacher = inputs / "teacher"
    out = tmp_path / "hf"
    minitron("export-hf", f"checkpoint={teacher}", f"output_dir={out}")
    first = snapshot(out)
    again = last_json(minitron("export-hf", f"checkpoint={teacher}", f"output_dir={out}"))
    assert again["already_complete"] and snapshot(out) == first
    changed = minitron("export-hf", f"checkpoint={teacher}", f"output_dir={out}", "dtype=bfloat16", check=False)
    assert changed.returncode == 2 and snapshot(out) == first
    assert "made with other settings (dtype: 'float32' -> 'bfloat16')" in changed.stderr.splitlines()[-1]
    (out / "notes.txt").write_text("my notes\n")
    foreign = minitron("export-hf", f"checkpoint={teacher}", f"output_dir={out}", "dtype=bfloat16", "overwrite=true",
                       check=False)
    assert foreign.returncode == 2 and "also holds ['notes.txt']: move them away first" in foreign.stderr
    (out / "notes.txt").unlink()
    minitron("export-hf", f"checkpoint={teacher}", f"output_dir={out}", "dtype=bfloat16", "overwrite=true")
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"

    # a checkpoint input rewritten in place is a changed setting too
    student = tmp_path / "student"
    shutil.copytree(teacher, student)
    exported = tmp_path / "student_hf"
    minitron("export-hf", f"checkpoint={student}", f"output_dir={exported}")
    metadata = json.loads((student / "metadata.json").read_text())
    (student / "metadata.json").write_text(json.dumps({**metadata, "saved_at": "later"}))
    stale = minitron("export-hf", f"checkpoint={student}", f"output_dir={exported}", check=False)
    assert stale.returncode == 2 and "checkpoint.content:" in stale.stderr.splitlines()[-1]


def test_corpus_output_dir_is_claimed(inputs, tmp_path):
    from nemo_minitron import UserError
    from nemo_minitron.data.corpus import ensure_corpus

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "train.jsonl").write_text('{"text": "my own split"}\n')
    with pytest.raises(UserError, match=r"corpus.output_dir=.*mine is not empty and holds files nemo-minitron did"):
        ensure_corpus(mine, sources=[], user_paths=[str(inputs / "docs.jsonl")])
    assert (mine / "train.jsonl").read_text() == '{"text": "my own split"}\n'
    splits = ensure_corpus(tmp_path / "corpus", sources=[], user_paths=[str(inputs / "docs.jsonl")])
    assert splits["train"].is_file()
    assert ensure_corpus(tmp_path / "corpus", sources=[], user_paths=[str(inputs / "docs.jsonl")]) == splits


def nan_checkpoint(teacher: str, out: str) -> None:
    """A sound checkpoint (checksums and shapes fine) of a model whose final norm is NaN."""
    from nemo_minitron import checkpoint

    model = checkpoint.load_checkpoint(teacher)
    with torch.no_grad():
        model.decoder.final_layernorm.weight.fill_(float("nan"))
    checkpoint.save_checkpoint(model, out, checkpoint.load_tokenizer(teacher), {"stage": "import"})


@pytest.mark.slow
def test_eval_of_a_nan_model_is_an_error_not_a_number(inputs, tmp_path):
    run_distributed(nan_checkpoint, world_size=1, args=(str(inputs / "teacher"), str(tmp_path / "nan")))
    proc = minitron("eval", f"checkpoint={tmp_path / 'nan'}", f"data={inputs / 'docs.jsonl'}", "seq_len=64",
                    check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.splitlines()[-1] == (
        f"error: checkpoint={tmp_path / 'nan'} gives a non-finite loss (nan) on data={inputs / 'docs.jsonl'}: its "
        f"weights hold NaN or Inf (a diverged run?); evaluate an earlier checkpoint")


# --- the loss-spike guard ----------------------------------------------------------------------------

def spiky_run(action: str, spike_at: int, tmp: str):
    """Six LM steps whose loss is multiplied by 1000 at step `spike_at`: per-step metrics and the
    weights before and after that step (or the TrainingDiverged message)."""
    from nemo_minitron.errors import TrainingDiverged
    from nemo_minitron.models import bridge
    from nemo_minitron.models.gpt import build_gpt_model
    from nemo_minitron.train import LMLoss, OptimConfig, TokenWindows, TrainConfig, Trainer, TrainingData
    from nemo_minitron.train.config import SpikeConfig
    from tiny import SENTENCES, tiny_tokenizer

    class Spiking(LMLoss):
        def __call__(self, output, batch):
            loss, metrics = super().__call__(output, batch)
            scale = 1000.0 if trainer.step + 1 == spike_at else 1.0
            return loss * scale, metrics

    torch.manual_seed(0)
    model = build_gpt_model(tiny_arch(tie=True))
    ids = torch.tensor(tiny_tokenizer()(" ".join(SENTENCES * 8), add_special_tokens=False)["input_ids"])
    train = TrainConfig(steps=6, global_batch_size=2, seq_length=16, progress_bar=False,
                        spike=SpikeConfig(factor=5.0, window=2, action=action, max_skips=1))
    trainer = Trainer(model, Spiking(), TrainingData(TokenWindows(ids, 16, seed=0), None), train,
                      OptimConfig(lr=1e-3, min_lr=1e-4), tmp)
    weights = {}
    try:
        for step in range(1, 7):
            if step == spike_at:
                weights["before"] = bridge.gather_global(model)
            metrics = trainer.train_step()
            trainer._check_spikes(metrics, _NoMonitor())
            if step == spike_at:
                weights["after"] = bridge.gather_global(model)
                weights["skipped"] = metrics["train/skipped"]
    except TrainingDiverged as err:
        return str(err)
    return weights


class _NoMonitor:
    def step(self, *args, **kwargs) -> None:
        pass


@pytest.mark.slow
def test_loss_spike_is_skipped_or_stops_the_run(tmp_path):
    [skipped] = run_distributed(spiky_run, world_size=1, args=("skip", 4, str(tmp_path / "skip")))
    assert skipped["skipped"] == 1.0
    assert all(torch.equal(skipped["before"][k], skipped["after"][k]) for k in skipped["before"])
    [stopped] = run_distributed(spiky_run, world_size=1, args=("stop", 4, str(tmp_path / "stop")))
    assert stopped.startswith("loss spike at step 4: loss=") and "train.spike.action=stop" in stopped


# --- SIGKILL at random points --------------------------------------------------------------------------

def _distill(root: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "nemo_minitron.cli.main", "distill", f"teacher={root / 'teacher'}",
            f"student={root / 'teacher'}", f"output_dir={out}", f"data.train={root / 'docs.jsonl'}",
            f"data.cache_dir={root / 'cache'}", "train.steps=12", "train.global_batch_size=2", "train.seq_length=32",
            "train.log_interval=1", "train.save_interval=3", "train.progress_bar=false", "train.eval_batches=0",
            "optim.warmup_steps=1"]


def _descendants(pid: int) -> set[int]:
    """Every process below `pid` (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) if entry.name.isdigit() else None
        except (OSError, IndexError, ValueError):
            continue
        if ppid is not None:
            children.setdefault(ppid, []).append(int(entry.name))
    found, stack = set(), [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            found.add(child)
            stack.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.slow
def test_sigkill_at_random_points_leaves_no_process_and_resumes_exactly(inputs, tmp_path):
    # steps 3, 6, 9 save a checkpoint right after their log line: a kill there lands inside a save
    kill_steps = sorted(random.Random(14).sample([2, 3, 5, 6, 8, 9], 2))
    out = tmp_path / "killed"
    for step in kill_steps:
        proc = subprocess.Popen(_distill(inputs, out), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=ENV)
        for line in proc.stderr:
            if f"step {step}:" in line:
                below = _descendants(proc.pid)
                proc.send_signal(signal.SIGKILL)
                break
        proc.communicate(timeout=120)
        assert proc.returncode == -signal.SIGKILL
        deadline = time.time() + 10
        while any(map(_alive, below)) and time.time() < deadline:
            time.sleep(0.2)
        assert not [pid for pid in below if _alive(pid)], "a process outlived the killed run"
        assert not (out / "final").exists()
    resumed = subprocess.run(_distill(inputs, out), capture_output=True, text=True, env=ENV, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    whole = subprocess.run(_distill(inputs, tmp_path / "whole"), capture_output=True, text=True, env=ENV, timeout=600)
    assert whole.returncode == 0, whole.stderr[-3000:]
    [(ours, ref)] = run_distributed(global_weights, world_size=1, args=(str(out / "final"), str(tmp_path / "whole" /
                                                                                                "final")))
    assert ours.keys() == ref.keys() and all(torch.equal(ours[k], ref[k]) for k in ours)
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 13))  # one row per step, however often it was killed
    assert os.listdir(out / "checkpoints") and not [p for p in os.listdir(out / "checkpoints") if "partial" in p]


def test_every_json_file_is_read_with_one_wording(tmp_path):
    from nemo_minitron.checkpoint import CheckpointError
    from nemo_minitron.errors import UserError, read_json

    cases = {"cut.json": ('{"a": 1,', "is not valid JSON (Expecting property name enclosed in double quotes: line 1 "
                                      "column 9)"),
             "latin1.json": ('"caf\xe9"'.encode("latin-1"), "is not valid JSON (not UTF-8 text: byte 4)"),
             "list.json": ("[1, 2]", "holds a JSON list, not a JSON dict")}
    for name, (content, message) in cases.items():
        path = tmp_path / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        with pytest.raises(CheckpointError) as err:
            read_json(path, CheckpointError)
        assert str(err.value) == f"{path} {message}"
    with pytest.raises(UserError, match=rf"^cannot read {tmp_path / 'absent.json'}: No such file or directory$"):
        read_json(tmp_path / "absent.json")
    assert read_json(tmp_path / "list.json", kind=None) == [1, 2]
