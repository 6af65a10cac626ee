"""lm-evaluation-harness through our in-process Megatron LM equals lm-eval's own HF backend on the
same weights, at TP=1, TP=2 and PP=2, on local tasks (no hub)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("lm_eval")

from distributed import run_distributed  # noqa: E402
from nemo_minitron.models import bridge  # noqa: E402
from tiny import SENTENCES, hf_model, tiny_arch, tiny_tokenizer  # noqa: E402

MC_DOCS = [
    {"question": "The quick brown fox", "choices": [" jumps over the lazy dog.", " must be in want of a wife."], "answer": 0},
    {"question": "It is a truth universally", "choices": [" acknowledged, that", " over the lazy"], "answer": 0},
    {"question": "Pruning and distillation make", "choices": [" a wife.", " small models from large ones."], "answer": 1},
    {"question": "", "choices": [" fortune", " fox"], "answer": 1},
]


def write_tasks(root: Path) -> Path:
    (root / "mc.jsonl").write_text("".join(json.dumps(d) + "\n" for d in MC_DOCS))
    (root / "text.jsonl").write_text("".join(json.dumps({"text": " ".join(SENTENCES[i:] * 3)}) + "\n" for i in range(3)))
    (root / "gen.jsonl").write_text("".join(json.dumps({"prompt": s[:20], "target": s[20:30]}) + "\n" for s in SENTENCES))
    common = "dataset_path: json\ntest_split: test\n"
    (root / "tiny_mc.yaml").write_text(
        f"task: tiny_mc\n{common}dataset_kwargs:\n  data_files:\n    test: {root / 'mc.jsonl'}\n"
        "output_type: multiple_choice\ndoc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\n"
        "doc_to_target: '{{answer}}'\ntarget_delimiter: ''\nmetric_list:\n  - metric: acc\n"
    )
    (root / "tiny_ppl.yaml").write_text(
        f"task: tiny_ppl\n{common}dataset_kwargs:\n  data_files:\n    test: {root / 'text.jsonl'}\n"
        "output_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: '{{text}}'\n"
        "metric_list:\n  - metric: word_perplexity\n  - metric: bits_per_byte\n"
    )
    (root / "tiny_gen.yaml").write_text(
        f"task: tiny_gen\n{common}dataset_kwargs:\n  data_files:\n    test: {root / 'gen.jsonl'}\n"
        "output_type: generate_until\ndoc_to_text: '{{prompt}}'\ndoc_to_target: '{{target}}'\n"
        "generation_kwargs:\n  until: ['.']\n  max_gen_toks: 6\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n"
    )
    return root


def ours(arch, global_sd, task_dir, max_length):
    from nemo_minitron.eval.harness import run_harness
    from nemo_minitron.models.gpt import build_gpt_model

    model = build_gpt_model(arch)
    bridge.load_global(model, global_sd)
    return run_harness(model, tiny_tokenizer(arch.vocab_size), ["tiny_mc", "tiny_ppl", "tiny_gen"],
                       include_path=str(task_dir), max_length=max_length, batch_size=3)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    task_dir = write_tasks(tmp_path_factory.mktemp("tasks"))
    arch = tiny_arch(tie=False)
    model = hf_model(arch)
    global_sd = bridge.hf_to_global(arch, model.state_dict())
    # max_length 16 < the rolling documents' length, so windowing is exercised too
    reference = lm_eval.simple_evaluate(
        model=HFLM(pretrained=model, tokenizer=tiny_tokenizer(arch.vocab_size), batch_size=1, max_length=16),
        tasks=["tiny_mc", "tiny_ppl", "tiny_gen"], task_manager=TaskManager(include_path=str(task_dir)),
        log_samples=False, bootstrap_iters=0,
    )["results"]
    return arch, global_sd, task_dir, reference


@pytest.mark.parametrize("tp,pp", [(1, 1), pytest.param(2, 1, marks=pytest.mark.slow), pytest.param(1, 2, marks=pytest.mark.slow)])
def test_matches_lm_eval_hf_backend(setup, tp, pp):
    arch, global_sd, task_dir, reference = setup
    results = run_distributed(ours, world_size=tp * pp, tp=tp, pp=pp, args=(arch, global_sd, task_dir, 16))
    for result in results:  # every rank reports the same numbers
        assert result["tiny_mc"]["acc"] == reference["tiny_mc"]["acc,none"]
        assert result["tiny_ppl"]["word_perplexity"] == pytest.approx(reference["tiny_ppl"]["word_perplexity,none"], rel=1e-5)
        assert result["tiny_ppl"]["bits_per_byte"] == pytest.approx(reference["tiny_ppl"]["bits_per_byte,none"], rel=1e-5)
        assert result["tiny_gen"]["exact_match"] == reference["tiny_gen"]["exact_match,none"]


def test_unknown_task_is_a_clear_error(setup):
    from nemo_minitron.eval.harness import run_harness

    with pytest.raises(ValueError, match="unknown task"):
        run_harness(None, None, ["no_such_task"], include_path=str(setup[2]))


@pytest.mark.slow
def test_eval_cli_runs_harness_tasks(setup, tmp_path):
    """`minitron eval harness.tasks=[...]` on a checkpoint, next to perplexity, JSON on the last line."""
    from commands import last_json, minitron
    from tiny import write_hf_dir

    arch, _, task_dir, _ = setup
    hf_dir = tmp_path / "hf"
    write_hf_dir(hf_dir, arch)
    minitron("import", f"hf_path={hf_dir}", f"output_dir={tmp_path / 'ckpt'}")
    text = tmp_path / "text.txt"
    text.write_text("\n\n".join(SENTENCES * 4))
    result = last_json(minitron("eval", f"checkpoint={tmp_path / 'ckpt'}", f"data={text}", "seq_len=16",
                                "harness.tasks=[tiny_mc]", f"harness.include_path={task_dir}", "harness.max_length=16"))
    assert result["perplexity"] > 1 and result["tokens"] > 0
    assert 0 <= result["harness"]["tiny_mc"]["acc"] <= 1
    proc = minitron("eval", f"checkpoint={tmp_path / 'ckpt'}", check=False)
    assert proc.returncode == 2 and "nothing to evaluate" in proc.stderr
