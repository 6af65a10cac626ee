"""Alignment stages: data readers (NeMo-Aligner formats, errors with line numbers), exact response
masks, the built-in data set, and SFT / DPO on the embedded student end to end."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from nemo_minitron.align import datasets as ds
from nemo_minitron.align.builtin_data import build_alignment_data
from nemo_minitron.align.formatting import Turn, encode_conversation, encode_prompt_response
from tiny import keep_layers, tiny_tokenizer


def write_jsonl(path: Path, lines: list) -> Path:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def test_sft_formats_and_exact_response_mask(tmp_path):
    tok = tiny_tokenizer()
    path = write_jsonl(tmp_path / "sft.jsonl", [
        {"system": "Be brief.", "mask": "User", "conversations": [
            {"from": "User", "value": "a fox"}, {"from": "Assistant", "value": "jumps over"},
            {"from": "User", "value": "then?"}, {"from": "Assistant", "value": "the lazy dog"}]},
        {"input": "It is a truth", "output": "universally acknowledged"},
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "a wife"}]},
    ])
    conversations = ds.read_sft(path)
    assert [t.role for t in conversations[0]] == ["system", "user", "assistant", "user", "assistant"]
    encoded = encode_conversation(tok, conversations[0])
    trained = tok.decode([t for t, m in zip(encoded.tokens, encoded.train_mask) if m])
    # exactly the assistant turns and their end-of-turn marker, nothing of the user or system text
    assert trained == "jumps over<|endoftext|>\nthe lazy dog<|endoftext|>\n"
    sample = ds.SFTDataset(conversations, tok, seq_length=64)[1]
    assert sample["tokens"].shape == sample["labels"].shape == sample["loss_mask"].shape == (64,)
    assert tok.decode(sample["labels"][sample["loss_mask"] > 0]) == "universally acknowledged<|endoftext|>\n"


def packed_vs_unpacked(conversations):
    from nemo_minitron.align.evaluate import response_logprobs
    from nemo_minitron.models.gpt import build_gpt_model
    from tiny import tiny_arch

    model = build_gpt_model(tiny_arch())
    tok = tiny_tokenizer()
    plain = ds.SFTDataset(conversations, tok, seq_length=256)
    packed = ds.SFTDataset(conversations, tok, seq_length=256, pack=True)
    (a, n_a), (b, n_b) = response_logprobs(model, plain, 2), response_logprobs(model, packed, 2)
    return len(plain), len(packed), a.sum(), b.sum(), n_a.sum(), n_b.sum()


def test_packed_sequences_score_like_separate_ones():
    from distributed import run_distributed

    conversations = [[Turn("user", f"question {i} about a fox"), Turn("assistant", "the lazy dog " * (1 + i % 3))]
                     for i in range(9)]
    [(n_plain, n_packed, plain, packed, tokens_plain, tokens_packed)] = run_distributed(
        packed_vs_unpacked, world_size=1, args=(conversations,))
    assert n_packed < n_plain == 9
    assert tokens_plain == tokens_packed
    assert abs(plain - packed) < 1e-3 * abs(plain)


def test_malformed_lines_are_reported_with_line_numbers(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [
        {"input": "ok", "output": "fine"},
        "{not json",
        {"conversations": [{"from": "User", "value": "only a question"}]},
        {"conversations": [{"from": "Robot", "value": "x"}]},
        {"input": 3, "output": "x"},
    ])
    with pytest.raises(ds.AlignDataError) as err:
        ds.read_sft(path)
    message = str(err.value)
    assert message.startswith("4 malformed line(s)")
    for line, what in [(2, "Expecting property name"), (3, "no assistant turn"), (4, "unknown speaker 'Robot'"),
                       (5, "field 'input' must be a string")]:
        assert re.search(rf"bad.jsonl:{line}: [^;]*{what}", message), (line, message)
    prefs = write_jsonl(tmp_path / "prefs.jsonl", [{"prompt": "p", "chosen_response": "a", "rejected_response": "b"},
                                                   {"prompt": "p", "chosen_response": "a"}])
    with pytest.raises(ds.AlignDataError, match=r"prefs.jsonl:2: missing field 'rejected_response'"):
        ds.read_preferences(prefs)
    good = write_jsonl(tmp_path / "good.jsonl", [{"prompt": "p", "chosen_response": "a", "rejected_response": "b"}])
    with pytest.raises(ds.AlignDataError, match="RPO needs chosen_reward"):
        ds.read_preferences(good, need_rewards=True)
    steer = write_jsonl(tmp_path / "steer.jsonl", [{"conversations": [
        {"from": "User", "value": "q"}, {"from": "Assistant", "value": "a"}]}])
    with pytest.raises(ds.AlignDataError, match="steer.jsonl:1: SteerLM needs a 'label'"):
        ds.read_steerlm(steer)


def test_preference_pairs_are_consecutive_and_raw_prompts_verbatim():
    tok = tiny_tokenizer()
    pairs = [ds.PreferencePair("The quick brown fox", " jumps", " sleeps", 4.0, 1.0),
             ds.PreferencePair([Turn("user", "a single man")], "in want", "of tea")]
    data = ds.PreferenceDataset(pairs, tok, seq_length=48)
    assert len(data) == 4
    chosen, rejected = data[0], data[1]
    assert tok.decode(chosen["labels"][chosen["loss_mask"] > 0]) == " jumps<|endoftext|>"
    assert tok.decode(rejected["labels"][rejected["loss_mask"] > 0]) == " sleeps<|endoftext|>"
    assert (chosen["reward"].item(), rejected["reward"].item()) == (4.0, 1.0)
    assert data[3]["reward"].isnan()
    raw = encode_prompt_response(tok, "The quick brown fox", " jumps")
    assert tok.decode(raw.tokens) == "The quick brown fox jumps<|endoftext|>"


def test_builtin_data_set_uses_nemo_aligner_formats(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for split, n in (("train", 6), ("heldout", 3)):
        words = [f"{split}{i}" for i in range(400)]
        write_jsonl(corpus / f"{split}.jsonl", [{"text": " ".join(words[j * 7:] + words[: j * 7])} for j in range(n)])
    paths = build_alignment_data(corpus, tmp_path / "out", train_examples=5, heldout_examples=3)
    assert len(ds.read_sft(paths["sft_train"])) == 5
    assert len(ds.read_steerlm(paths["steerlm_train"])) == 10  # true + corrupted per example
    pairs = ds.read_preferences(paths["dpo_heldout"], need_rewards=True)
    assert len(pairs) == 3 and all(p.chosen != p.rejected and p.chosen_reward > p.rejected_reward for p in pairs)
    # held-out examples come only from held-out documents, training examples only from training ones
    passage = lambda p: p.prompt[0].content.split("\n\n", 1)[1].split()  # noqa: E731
    assert all(w.startswith("heldout") for p in pairs for w in passage(p) + p.chosen.split())
    assert all(w.startswith("train") for p in ds.read_preferences(paths["dpo_train"]) for w in passage(p))


def dry_run(*args: str):
    """`minitron align` with the NeMo-Aligner backend's dry run: the process (its commands are the
    last stdout line's JSON)."""
    from commands import minitron

    return minitron("align", "method=rpo", "backend=nemo_aligner", "nemo_aligner.dry_run=true", "tp=2",
                    "loss.beta=0.2", "train.steps=7", *args, check=False)


def test_nemo_aligner_backend_translates_the_config(tmp_path):
    from commands import last_json

    proc = dry_run(f"student={tmp_path}/ckpt", f"output_dir={tmp_path}/out", "data.train=/d/train.jsonl",
                   "data.valid=/d/valid.jsonl")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "deprecated" not in proc.stderr
    export, convert, train = last_json(proc)["commands"]
    assert "export-hf" in export and f"checkpoint={tmp_path}/ckpt" in export
    assert "convert_llama_hf_to_nemo.py" in convert
    assert "train_gpt_dpo.py" in train and "model.dpo.preference_loss=rpo_bwd_kl" in train
    assert "model.dpo.ref_policy_kl_penalty=0.2" in train and "trainer.dpo.max_steps=7" in train
    assert "model.tensor_model_parallel_size=2" in train
    assert "model.data.data_prefix={train: [/d/train.jsonl], validation: [/d/valid.jsonl]" in train


def test_the_deprecated_keys_still_work_on_the_command_line_with_a_warning(tmp_path):
    """checkpoint= (student), data=FILE (data.train) and valid_data= (data.valid): the same commands
    as the new keys, each named in a warning; an alias that disagrees with its key is one error line."""
    from commands import last_json

    new = dry_run(f"student={tmp_path}/ckpt", f"output_dir={tmp_path}/out", "data.train=/d/train.jsonl",
                  "data.valid=/d/valid.jsonl")
    old = dry_run(f"checkpoint={tmp_path}/ckpt", f"output_dir={tmp_path}/out", "data=/d/train.jsonl",
                  "valid_data=/d/valid.jsonl")
    assert old.returncode == 0, old.stderr[-3000:]
    assert last_json(old) == last_json(new)
    for warning in (f"checkpoint={tmp_path}/ckpt is deprecated: use student=", "data=/d/train.jsonl is deprecated: "
                    "use data.train=", "valid_data=/d/valid.jsonl is deprecated: use data.valid="):
        assert warning in old.stderr, warning
    clash = dry_run(f"student={tmp_path}/a", f"checkpoint={tmp_path}/b", f"output_dir={tmp_path}/out")
    assert clash.returncode == 2
    assert clash.stderr.strip().splitlines()[-1] == (f"error: student={tmp_path}/a and its deprecated alias "
                                                     f"checkpoint={tmp_path}/b disagree")


def test_align_has_the_training_stages_keys_and_dtype():
    """`student`, `data.train` / `data.valid`, `train.*`, `optim.*`, `output_dir` and `dtype: auto`,
    as distill and teacher-correct."""
    from nemo_minitron.align.stage import AlignConfig
    from nemo_minitron.distill.stage import DistillConfig
    from nemo_minitron.stage_config import defaults_of
    from nemo_minitron.train.training_stage import TrainingStageConfig

    assert issubclass(AlignConfig, TrainingStageConfig)
    defaults = defaults_of(AlignConfig)
    assert defaults["dtype"] == "auto" and AlignConfig().dtype == DistillConfig().dtype
    assert defaults["student"] is None and defaults["data"]["train"] is None and defaults["data"]["valid"] is None


@pytest.mark.parametrize(("old", "new", "read"), [
    ({"stage": "dpo"}, {"method": "dpo"}, lambda c: c.method),
    ({"checkpoint": "runs/student"}, {"student": "runs/student"}, lambda c: c.student),
    ({"data": "chat.jsonl"}, {"data": {"train": "chat.jsonl"}}, lambda c: c.data.train),
    ({"data": "chat.jsonl", "valid_data": "val.jsonl"}, {"data": {"train": "chat.jsonl", "valid": "val.jsonl"}},
     lambda c: (c.data.train, c.data.valid)),
])
def test_each_deprecated_key_works_from_python_with_a_warning(old, new, read, caplog):
    from nemo_minitron.align.stage import AlignConfig
    from nemo_minitron.train.config import DataConfig

    expected = AlignConfig(**{k: DataConfig(**v) if k == "data" else v for k, v in new.items()})
    with pytest.warns(FutureWarning, match="is deprecated"):
        aliased = AlignConfig(**old)
    assert aliased == expected and read(aliased) == read(expected)
    assert (aliased.stage, aliased.checkpoint, aliased.valid_data) == (None, None, None)
    for key in old:
        assert any(f"align: {key}=" in r.getMessage() and "is deprecated" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(("config", "message"), [
    ({"method": "sft", "stage": "dpo"}, "method=sft and its deprecated alias stage=dpo disagree"),
    ({"student": "a", "checkpoint": "b"}, "student=a and its deprecated alias checkpoint=b disagree"),
    ({"data": {"train": "t", "valid": "v"}, "valid_data": "w"}, "data.valid=v and its deprecated alias valid_data=w "
                                                                  "disagree"),
])
def test_an_alias_that_disagrees_with_its_key_is_a_user_error(config, message):
    from nemo_minitron.align.stage import AlignConfig
    from nemo_minitron.errors import UserError
    from nemo_minitron.train.config import DataConfig

    with pytest.warns(FutureWarning), pytest.raises(UserError, match=message):
        AlignConfig(**{k: DataConfig(**v) if k == "data" else v for k, v in config.items()})


def test_the_old_data_spelling_composes_in_a_stage_and_a_pipeline_block():
    """`data=FILE` replaces the `data` block with a string in the composed config, which the typed
    merge could not take: it becomes data.train, in `minitron align` and in the pipeline's align block."""
    from hydra import compose

    from nemo_minitron.align.stage import AlignConfig
    from nemo_minitron.cli.compose import hydra_conf, typed
    from nemo_minitron.pipeline import PipelineConfig

    with hydra_conf(), pytest.warns(FutureWarning, match="`data=` is deprecated"):
        stage = typed(AlignConfig, compose(config_name="align", overrides=["data=chat.jsonl", "valid_data=v.jsonl"]))
        pipeline = typed(PipelineConfig, compose(config_name="pipeline", overrides=["align.data=chat.jsonl"]))
    assert (stage.data.train, stage.data.valid, stage.valid_data) == ("chat.jsonl", "v.jsonl", None)
    assert pipeline.align.data.train == "chat.jsonl"
    with hydra_conf():
        assert typed(AlignConfig, compose(config_name="align", overrides=["data=null"])).data == AlignConfig().data


@pytest.mark.parametrize(("data", "message"), [
    ({"valid": "v.jsonl"}, "data.valid is set but data.train is not"),
    ({"train": "t.jsonl", "text_key": "body"}, "data.text_key=body does not apply to align"),
    ({"train": "t.jsonl", "cache_dir": "/c"}, "data.cache_dir=/c does not apply to align"),
])
def test_data_keys_align_does_not_read_are_refused_before_any_work(data, message, tmp_path):
    from nemo_minitron.align.stage import AlignConfig, align_checkpoint
    from nemo_minitron.errors import UserError
    from nemo_minitron.train.config import DataConfig

    cfg = AlignConfig(method="sft", student=str(tmp_path / "student"), output_dir=str(tmp_path / "out"),
                      data=DataConfig(**data))
    with pytest.raises(UserError, match=message):
        align_checkpoint(cfg)
    assert not (tmp_path / "out").exists()


# --- end to end on the embedded student -------------------------------------------------------

def depth_pruned_student(teacher: Path, out: Path, keep: list[int]) -> None:
    """A cheap student for alignment tests: a subset of the teacher's layers."""
    from nemo_minitron import checkpoint
    from nemo_minitron.models import bridge
    from nemo_minitron.models.gpt import arch_of, build_gpt_model

    model = checkpoint.load_checkpoint(teacher)
    student = build_gpt_model(arch_of(model).replace(num_layers=len(keep)))
    bridge.load_global(student, keep_layers(bridge.gather_global(model), keep))
    checkpoint.save_checkpoint(student, out, checkpoint.load_tokenizer(teacher), metadata={"stage": "test"})


@pytest.fixture(scope="module")
def embedded(tmp_path_factory, embedded_teacher):
    from distributed import run_distributed

    root = tmp_path_factory.mktemp("embedded")
    run_distributed(depth_pruned_student, world_size=1, args=(embedded_teacher, root / "student", [0, 1, 2, 3, 28, 29]))
    return root


# float32, as the thresholds below were set (dtype=auto is bf16 on a GPU or a CPU with native bf16)
ALIGN_ARGS = ("dtype=float32", "train.seq_length=176", "train.global_batch_size=8", "train.micro_batch_size=8", "train.log_interval=5",
              "builtin.train_examples=128", "builtin.heldout_examples=32")


@pytest.mark.slow
@pytest.mark.measure
def test_sft_lowers_heldout_response_loss(embedded):
    from commands import last_json, minitron

    result = last_json(minitron("align", "method=sft", f"student={embedded / 'student'}",
                                f"output_dir={embedded / 'sft'}", "train.steps=6", "optim.lr=1e-4", "optim.warmup_steps=1",
                                f"builtin.cache_dir={embedded / 'cache'}", *ALIGN_ARGS))
    assert result["heldout_response_loss_after"] < result["heldout_response_loss_before"] - 1.0


@pytest.mark.slow
@pytest.mark.measure
def test_dpo_raises_heldout_preference_accuracy(embedded):
    from commands import last_json, minitron

    result = last_json(minitron("align", "method=dpo", f"student={embedded / 'student'}",
                                f"output_dir={embedded / 'dpo'}", "train.steps=8", "optim.lr=2e-5", "optim.warmup_steps=1",
                                "loss.beta=0.1", f"builtin.cache_dir={embedded / 'cache'}", *ALIGN_ARGS))
    assert result["heldout_preference_accuracy_after"] > result["heldout_preference_accuracy_before"]
    assert "train/reward_margin" in result["train"] and "val/preference_accuracy" in result["valid"]
