"""The plugin API on models built with megatron-core's own constructors: the docs/api.md example at
TP=1 (SmolLM2), TP=2 and PP=2 equals `minitron prune` on the same checkpoint and calibration windows;
`arch_of` reads any GPTModel and names what it cannot handle; pruning through a Float16Module
wrapper works, through DDP is refused; a non-editable install finds its configs."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from commands import ENV, last_json, minitron
from distributed import run_distributed
from nemo_minitron import checkpoint
from shared import copy_tiny_teacher
from tiny import global_weights, tiny_arch, write_sentence_docs

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE_MARK = "<!-- example: prune_example.py"


def example_source(teacher: Path, calib: Path, output: Path, target: dict) -> str:
    """The python block after the example mark in docs/api.md, its constants pointed at this test's files."""
    doc = (ROOT / "docs" / "api.md").read_text()
    block = doc[doc.index(EXAMPLE_MARK):].split("```python\n", 1)[1].split("\n```", 1)[0]
    replacements = {"TEACHER": f"Path({str(teacher)!r})", "CALIB": f"Path({str(calib)!r})",
                    "OUTPUT": f"Path({str(output)!r})", "TARGET": repr(target)}
    for name, value in replacements.items():
        block, count = re.subn(rf"^{name} = .*$", f"{name} = {value}", block, count=1, flags=re.M)
        assert count == 1, f"docs/api.md example lost its {name} constant"
    return block


def run_example(tmp_path: Path, source: str, nproc: int = 1, **env: str) -> str:
    script = tmp_path / "prune_example.py"
    script.write_text(source)
    launcher = [sys.executable] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    proc = subprocess.run([*launcher, str(script)], capture_output=True, text=True, env={**ENV, **env},
                          timeout=900, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout


def weights_in_process(path: Path) -> dict[str, torch.Tensor]:
    from nemo_minitron import parallel

    parallel.initialize()
    return global_weights(path)[0]


def assert_same_as_cli(api_out: Path, teacher: Path, calib: Path, cli_out: Path, target: dict, eval_seq: int):
    minitron("prune", f"checkpoint={teacher}", f"output_dir={cli_out}", f"calib.data={calib}", "calib.num_samples=16",
             "calib.seq_len=64", "depth.method=block_importance", "report_loss=false",
             *[f"target.{k}={v}" for k, v in target.items()])
    assert checkpoint.read_arch(api_out) == checkpoint.read_arch(cli_out)
    ours, cli = weights_in_process(api_out), weights_in_process(cli_out)
    assert ours.keys() == cli.keys()
    assert all(torch.equal(ours[k], cli[k]) for k in ours)
    perplexity = [last_json(minitron("eval", f"checkpoint={path}", f"data={calib}", f"seq_len={eval_seq}"))["perplexity"]
                  for path in (api_out, cli_out)]
    assert perplexity[0] == perplexity[1]


@pytest.fixture(scope="module")
def calib(tmp_path_factory) -> Path:
    return write_sentence_docs(tmp_path_factory.mktemp("api_calib") / "calib.jsonl", 48)


@pytest.mark.slow
@pytest.mark.measure
def test_api_example_on_smollm2_equals_the_cli(tmp_path, calib, embedded_teacher):
    teacher = embedded_teacher
    target = {"ffn_hidden_size": 768, "num_layers": 24}
    out = run_example(tmp_path, example_source(teacher, calib, tmp_path / "api", target))
    assert "pruned to {'num_layers': 24, 'hidden_size': 576, 'ffn_hidden_size': 768}" in out
    kd_losses = [float(v) for v in re.findall(r"KD loss ([0-9.]+)", out)]
    assert len(kd_losses) == 2 and all(0 < v < 20 for v in kd_losses)
    assert_same_as_cli(tmp_path / "api", teacher, calib, tmp_path / "cli", target, eval_seq=64)


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory, tiny_teacher_source) -> Path:
    # tiny_arch(tie=True): 2 query groups, which TP=2 splits
    return copy_tiny_teacher(tiny_teacher_source, tmp_path_factory.mktemp("api_tiny"))


@pytest.mark.slow
@pytest.mark.parametrize("layout", [{"TP": "2"}, {"PP": "2"}], ids=["tp2", "pp2"])
def test_api_example_at_tp2_and_pp2_equals_the_cli_at_tp1(tmp_path, tiny_teacher, calib, layout):
    target = {"ffn_hidden_size": 48, "hidden_size": 48, "num_layers": 2, "num_attention_heads": 2}
    out = run_example(tmp_path, example_source(tiny_teacher, calib, tmp_path / "api", target), nproc=2, **layout)
    assert "pruned to {'num_layers': 2, 'hidden_size': 48, 'ffn_hidden_size': 48}" in out
    assert_same_as_cli(tmp_path / "api", tiny_teacher, calib, tmp_path / "cli", target, eval_seq=32)


def reconstructed_in_place(teacher: Path, calib: Path, target: dict) -> dict[str, torch.Tensor]:
    """mt.prune with reconstruct_loop on the tiny teacher, as a plugin user writes it."""
    import nemo_minitron as mt
    from nemo_minitron.data.indexed import load_token_stream
    from nemo_minitron.importance import sample_windows
    from nemo_minitron.models import bridge

    model = checkpoint.load_checkpoint(teacher)
    stream = load_token_stream(calib, checkpoint.load_tokenizer(teacher))
    windows = sample_windows(stream, 64, 16, seed=0)
    scores = mt.estimate_importance(model, mt.perplexity_loop(windows, 4, progress=False))
    # the CLI checks each depth bridge on loss_samples=32 windows of its own draw (seed + 1)
    mt.prune(model, scores, **target, depth_method="block_importance",
             reconstruct_loop=mt.perplexity_loop(windows, 4, progress=False), reconstruct_depth=True,
             bridge_loss=mt.loss_metric(sample_windows(stream, 64, 32, seed=1), 4))
    return bridge.gather_global(model)


def test_prune_in_place_with_reconstruction_equals_the_cli(tmp_path, tiny_teacher, calib):
    # layers 1-2 dropped: layer 0's MLP bridges them, and the CLI checks that bridge
    target = {"ffn_hidden_size": 48, "hidden_size": 48, "drop_layers": [1, 2], "num_attention_heads": 2}
    [ours] = run_distributed(reconstructed_in_place, world_size=1, args=(tiny_teacher, calib, target))
    minitron("prune", f"checkpoint={tiny_teacher}", f"output_dir={tmp_path / 'cli'}", f"calib.data={calib}",
             "calib.num_samples=16", "calib.seq_len=64", "depth.method=block_importance", "report_loss=false",
             "reconstruct=true", "reconstruct_depth=true", *[f"target.{k}={v}" for k, v in target.items()])
    cli = weights_in_process(tmp_path / "cli")
    assert ours.keys() == cli.keys() and all(torch.equal(ours[k], cli[k]) for k in ours)
    reconstruction = json.loads((tmp_path / "cli" / "report.json").read_text())["reconstruction"]
    assert set(reconstruction["errors"]) == {"mlp", "attention"}
    assert reconstruction["bridges"]["windows"] == 32 and len(reconstruction["bridges"]["checks"]) == 1


# --- arch_of, wrappers, errors (in process) -------------------------------------------------------

def test_arch_of_reads_the_models_own_config():
    from nemo_minitron import parallel
    from nemo_minitron.models.gpt import arch_of, build_gpt_model

    parallel.initialize()
    for arch in (tiny_arch(), tiny_arch(tie=False, rope_scaling=True), tiny_arch(family="nemotron"),
                 tiny_arch(family="mistral", eos_token_id=5)):
        assert arch_of(build_gpt_model(arch)) == arch


def _megatron_model(**config_changes):
    """A GPTModel from megatron-core's constructors (local spec), sized like tiny_arch()."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig

    num_experts = config_changes.get("num_moe_experts")
    config = TransformerConfig(
        num_layers=2, hidden_size=64, ffn_hidden_size=96, num_attention_heads=4, num_query_groups=2, kv_channels=24,
        normalization="RMSNorm", gated_linear_unit=True, activation_func=torch.nn.functional.silu,
        add_bias_linear=False, use_cpu_initialization=True, **config_changes)
    return GPTModel(config=config, transformer_layer_spec=get_gpt_layer_local_spec(num_experts=num_experts,
                                                                                   normalization="RMSNorm"),
                    vocab_size=320, max_sequence_length=256, position_embedding_type="rope")


def test_arch_of_names_unsupported_features():
    from nemo_minitron import UserError, parallel
    from nemo_minitron.models.gpt import arch_of

    parallel.initialize()
    arch = arch_of(_megatron_model())
    assert (arch.family, arch.num_layers, arch.tie_embeddings, arch.kv_channels) == ("llama", 2, False, 24)
    assert arch_of(_megatron_model(num_moe_experts=2, moe_router_topk=2)).family == "mixtral"  # MoE layers
    with pytest.raises(UserError, match=r"moe_router_score_function='sigmoid'"):
        arch_of(_megatron_model(num_moe_experts=2, moe_router_topk=2, moe_router_score_function="sigmoid"))
    assert arch_of(_megatron_model(add_qkv_bias=True)).family == "qwen2"  # QKV biases are Qwen2's layers
    with pytest.raises(UserError, match=r"qk_layernorm=True but the layer spec's q_layernorm is IdentityOp"):
        arch_of(_megatron_model(add_qkv_bias=True, qk_layernorm=True))
    with pytest.raises(UserError, match="is not a megatron-core GPTModel"):
        arch_of(torch.nn.Linear(2, 2))
    with pytest.raises(UserError, match="virtual pipeline parallelism"):
        arch_of([_megatron_model(), _megatron_model()])


def test_prune_in_place_through_float16module_and_refused_under_ddp():
    import nemo_minitron as mt
    from megatron.core.transformer.module import Float16Module
    from nemo_minitron.models import bridge
    from nemo_minitron.models.gpt import build_gpt_model
    from nemo_minitron.pruning.indices import select_indices
    from nemo_minitron.pruning.surgery import prune_global
    from nemo_minitron.train.optim import wrap_data_parallel

    mt.parallel.initialize()
    arch = tiny_arch(tie=False)
    model = build_gpt_model(arch)
    scores = mt.ImportanceScores(arch=arch, method="random", hidden=torch.rand(64), heads=torch.rand(4, 4),
                                 neurons=torch.rand(4, 96), layers={"random": torch.tensor([3.0, 0.0, 2.0, 1.0])})
    reference = prune_global(bridge.gather_global(model), arch, arch.replace(num_layers=3, ffn_hidden_size=48),
                             select_indices(scores, arch, arch.replace(num_layers=3, ffn_hidden_size=48), [1]))
    model.config.bf16 = True  # Float16Module casts to bf16 (what a mixed-precision Megatron-LM run holds)
    wrapped = Float16Module(model.config, model)
    config = mt.prune(wrapped, scores, num_layers=3, ffn_hidden_size=48, depth_method="random")
    assert (config.num_layers, config.ffn_hidden_size) == (3, 48) and wrapped.module is model
    assert mt.arch_of(wrapped) == arch.replace(num_layers=3, ffn_hidden_size=48)
    pruned = bridge.gather_global(model)
    assert next(model.parameters()).dtype == torch.bfloat16
    assert all(torch.equal(pruned[k], reference[k].to(torch.bfloat16)) for k in reference)

    ddp = wrap_data_parallel(build_gpt_model(arch))
    with pytest.raises(mt.UserError, match="prune the model before wrapping it in DistributedDataParallel"):
        mt.prune(ddp, scores, ffn_hidden_size=48)


def test_load_weights_checks_the_architecture(tiny_teacher, tmp_path):
    import nemo_minitron as mt
    from nemo_minitron.models.gpt import build_gpt_model

    mt.parallel.initialize()
    wrong = build_gpt_model(tiny_arch(tie=True, ffn_hidden_size=64))
    with pytest.raises(mt.UserError, match=r"ffn_hidden_size=64 vs 96 \(model vs weights\)"):
        mt.load_weights(wrong, tiny_teacher)
    with pytest.raises(mt.UserError, match="neither a nemo-minitron checkpoint nor a Hugging Face model directory"):
        mt.load_weights(wrong, tmp_path)


def test_a_script_without_the_main_guard_is_told_to_add_it(tiny_teacher, tmp_path):
    """megatron's checkpoint writer spawns a helper that imports the script: an unguarded script
    would start its job again there. The helper stops at `parallel.initialize`, and the script's
    save fails saying what to change, its output left unpublished."""
    out = tmp_path / "saved"
    script = tmp_path / "unguarded.py"
    script.write_text("from nemo_minitron import checkpoint, parallel\n\nparallel.initialize()\n"
                      f"checkpoint.save_checkpoint(checkpoint.load_checkpoint({str(tiny_teacher)!r}), {str(out)!r})\n")
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=ENV, timeout=600,
                          cwd=tmp_path)
    advice = "put the script's top level under `if __name__ == \"__main__\":`"
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "this is a helper process importing the script, not the script's run" in proc.stderr  # the helper's
    last = proc.stderr.strip().splitlines()[-1]
    assert last.endswith("nemo_minitron.errors.UserError: the checkpoint writer's helper process ended as it "
                         f"started; megatron's checkpoint writer starts a helper process that imports the script "
                         f"you ran: {advice}"), last
    assert not out.exists()


@pytest.mark.slow
def test_non_editable_install_finds_its_configs(tmp_path):
    """`pip install .` (no -e) into a target directory: `minitron prune --help` composes the YAML
    that ships inside the package."""
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(ROOT)], check=True, capture_output=True, text=True, timeout=600)
    assert (target / "nemo_minitron" / "conf" / "recipes" / "mn_minitron_8b.yaml").is_file()
    env = {**ENV, "PYTHONPATH": str(target)}
    where = subprocess.run([sys.executable, "-c", "import nemo_minitron; print(nemo_minitron.__file__)"],
                           capture_output=True, text=True, env=env, cwd=tmp_path, check=True).stdout
    assert where.startswith(str(target))
    help_text = subprocess.run([sys.executable, "-m", "nemo_minitron.cli.main", "prune", "--help"], capture_output=True,
                               text=True, env=env, cwd=tmp_path, check=True, timeout=300).stdout
    assert "num_samples: 256" in help_text and "target:" in help_text


def test_float_settings_compare_within_float32_rounding():
    """A caller's config with the published norm epsilon (1e-5) is the checkpoint's, whose value
    went through float32 (9.999999747378752e-06); another epsilon is a difference."""
    arch = tiny_arch()
    assert arch.differences(arch.replace(norm_eps=float(torch.tensor(1e-5, dtype=torch.float32)))) == []
    assert arch.differences(arch.replace(norm_eps=1e-6, rope_theta=10000)) == ["rope_theta=50000.0 vs 10000",
                                                                              "norm_eps=1e-05 vs 1e-06"]
