"""The GPU path, where CUDA is present (`gpu` marker; scripts/gpu_check.sh runs this file on a GPU
node in under 10 minutes and prints one summary line). On a machine without CUDA every test here is
reported as skipped, with the reason.

- Transformer Engine's layer spec (fused norm + linear, TE attention) gives the local spec's logits
  for the same weights, dense, MoE and hybrid (megatron's own Mamba stack spec, with mamba_ssm's
  kernels where the image has them, else the torch ones on the GPU), and both give transformers'
  logits.
- TE norms under sequence parallelism: distillation at TP=2 with SP equals TP=1 (two GPUs).
- Importance hooks on grouped-GEMM experts (`TEGroupedMLP`) give the scores of one module per
  expert (`SequentialMLP`) holding the same weights.
- A bf16 distillation step on the GPU tracks fp32.
- `minitron pipeline` end to end on the GPU (a tiny teacher and the user's own text).
"""

from __future__ import annotations

import dataclasses
import importlib.util

import pytest
import torch

from commands import last_json, minitron
from distributed import run_distributed
from nemo_minitron.models import bridge
from tiny import hf_model, short_correction, tiny_arch, tiny_moe_arch, user_corpus, write_hf_dir

pytestmark = pytest.mark.gpu

TOKENS = torch.randint(0, 320, (2, 12), generator=torch.Generator().manual_seed(0))
ARCHS = {
    "llama": tiny_arch(tie=True),
    "nemotron": tiny_arch(tie=False, family="nemotron"),
    "qwen3": tiny_arch(tie=False, family="qwen3"),
    "qwen3_moe": tiny_moe_arch("qwen3_moe"),
    "nemotron_h": tiny_arch(tie=False, family="nemotron_h"),
}


def needs_transformer_engine():
    if importlib.util.find_spec("transformer_engine") is None:
        pytest.skip("needs Transformer Engine (the NGC NeMo container has it): not installed here")


def needs_gpus(count: int):
    if torch.cuda.device_count() < count:
        pytest.skip(f"needs {count} GPUs: this machine has {torch.cuda.device_count()}")


def _logits_of_both_specs(arch, global_sd):
    from nemo_minitron.models.gpt import build_gpt_model
    from nemo_minitron.models.runner import forward_microbatches, gather_vocab_parallel

    out = []
    for use_te in (True, False):
        model = build_gpt_model(arch, use_te=use_te)
        bridge.load_global(model, global_sd)
        [logits] = forward_microbatches(model, [{"tokens": TOKENS.cuda()}], lambda x, _: gather_vocab_parallel(x))
        out.append(logits.float().cpu())
    return out


@pytest.mark.parametrize("name", ARCHS)
def test_transformer_engine_spec_gives_the_local_specs_logits(name):
    needs_transformer_engine()
    arch = ARCHS[name]
    hf = hf_model(arch)
    global_sd = bridge.hf_to_global(arch, hf.state_dict())
    [(te, local)] = run_distributed(_logits_of_both_specs, world_size=1, args=(arch, global_sd))
    with torch.no_grad():
        expected = hf(TOKENS).logits
    # TF32 stays off for fp32 matmuls in torch and TE alike; kernels differ in summation order only
    torch.testing.assert_close(te, local, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(local, expected, rtol=1e-4, atol=1e-4)


def test_sequence_parallel_distillation_with_te_norms_at_tp2_equals_tp1(tmp_path):
    """The TE spec's fused norms under sequence parallelism: their weight gradients are summed over
    TP as megatron marks them, so TP=2 trains as TP=1 does."""
    needs_transformer_engine()
    needs_gpus(2)
    from test_distill import distill_run

    [(reference, _, weights)] = run_distributed(distill_run, world_size=1, args=(str(tmp_path / "tp1"),))
    for metrics, _, trained in run_distributed(distill_run, world_size=2, tp=2,
                                               args=(str(tmp_path / "tp2"), torch.float32, True)):
        for ours, theirs in zip(metrics, reference):
            assert ours["train/loss"] == pytest.approx(theirs["train/loss"], rel=1e-4)
            assert ours["train/grad_norm"] == pytest.approx(theirs["train/grad_norm"], rel=1e-4)
        for key, tensor in weights.items():
            torch.testing.assert_close(trained[key], tensor, rtol=0, atol=1e-4, msg=lambda m, key=key: f"{key}: {m}")


def _expert_scores_of_both_layouts(arch, global_sd, windows):
    """Importance of the same weights with one module per expert and with TE's grouped GEMM."""
    from megatron.core.models.gpt import GPTModel, gpt_layer_specs

    import nemo_minitron as mt
    from nemo_minitron.importance import perplexity_loop
    from nemo_minitron.models.gpt import build_gpt_model, portable_norm_keys

    sequential = build_gpt_model(arch, use_te=True)
    bridge.load_global(sequential, global_sd)
    grouped = GPTModel(
        config=dataclasses.replace(sequential.config, moe_grouped_gemm=True),
        transformer_layer_spec=portable_norm_keys(gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(
            num_experts=arch.num_moe_experts, moe_grouped_gemm=True, qk_layernorm=arch.qk_norm)),
        vocab_size=arch.vocab_size, max_sequence_length=arch.max_position_embeddings,
        share_embeddings_and_output_weights=arch.tie_embeddings, position_embedding_type="rope",
        rotary_base=int(arch.rope_theta)).cuda()
    with torch.no_grad():  # every non-expert weight by name, then expert i's into weight{i}
        experts = {n: p for n, p in sequential.named_parameters() if ".local_experts." in n}
        own = dict(grouped.named_parameters())
        for name, p in sequential.named_parameters():
            if name not in experts:
                own[name].copy_(p)
        for name, p in experts.items():
            prefix, rest = name.split(".local_experts.")
            index, linear, _ = rest.split(".")
            own[f"{prefix}.{linear}.weight{index}"].copy_(p)
    loop = perplexity_loop(windows, micro_batch_size=2, progress=False)
    return [mt.estimate_importance(model, loop) for model in (sequential, grouped)]


def test_importance_on_grouped_gemm_experts_equals_one_module_per_expert():
    needs_transformer_engine()
    arch = tiny_moe_arch("qwen3_moe")
    global_sd = bridge.hf_to_global(arch, hf_model(arch).state_dict())
    windows = torch.randint(0, 320, (4, 16), generator=torch.Generator().manual_seed(1))
    [(sequential, grouped)] = run_distributed(_expert_scores_of_both_layouts, world_size=1,
                                              args=(arch, global_sd, windows))
    for kind in ("output", "frequency", "router_mass"):
        torch.testing.assert_close(grouped.experts[kind], sequential.experts[kind], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grouped.neurons, sequential.neurons, rtol=1e-4, atol=1e-5)
    assert sequential.experts["frequency"].sum() > 0


def test_reconstruction_with_the_te_spec_equals_the_local_spec():
    """Reconstruction's hooks on Transformer Engine's linears (fc2, proj) and layers record what
    the local spec's do: the same refit weights, depth bridge included, on the GPU."""
    needs_transformer_engine()
    from test_reconstruct import RIDGE, _teacher, pruned_with_reconstruction

    teacher, _, sd, target, indices = _teacher()
    [(te, te_errors)] = run_distributed(pruned_with_reconstruction, world_size=1,
                                        args=(teacher, sd, target, indices, RIDGE, True, True))
    [(local, errors)] = run_distributed(pruned_with_reconstruction, world_size=1,
                                        args=(teacher, sd, target, indices, RIDGE, True, False))
    for name, tensor in local.items():
        torch.testing.assert_close(te[name].float().cpu(), tensor.float().cpu(), rtol=1e-3, atol=1e-4, msg=name)
    assert te_errors.keys() == errors.keys()


def test_bf16_distillation_on_the_gpu_tracks_fp32(tmp_path):
    from test_distill import distill_run

    [(fp32, _, _)] = run_distributed(distill_run, world_size=1, args=(str(tmp_path / "fp32"),))
    [(bf16, _, _)] = run_distributed(distill_run, world_size=1, args=(str(tmp_path / "bf16"), torch.bfloat16))
    for ours, theirs in zip(bf16, fp32):
        assert ours["train/loss"] == pytest.approx(theirs["train/loss"], rel=5e-2)
    assert bf16[-1]["train/loss"] < bf16[0]["train/loss"]


def test_pipeline_on_the_gpu(tmp_path):
    """The main job on a tiny teacher and a corpus of the user's own file (a GPU node reaches no
    Debian mirror): import, prune, distill in bf16, export, evaluate."""
    write_hf_dir(tmp_path / "hf", tiny_arch(tie=True))
    result = last_json(minitron(
        "pipeline", f"work_dir={tmp_path / 'run'}", f"teacher.hf_path={tmp_path / 'hf'}",
        *user_corpus(tmp_path / "docs.jsonl"),
        "prune.target.ffn_hidden_size=48", "prune.target.num_layers=3", "prune.calib.num_samples=8",
        "prune.calib.seq_len=16", "prune.loss_samples=2", "distill.train.steps=4", "distill.train.seq_length=16",
        "distill.optim.warmup_steps=1", "distill.train.save_interval=0", "eval.seq_len=16", "eval.max_tokens=256",
        *short_correction(16)))
    assert result["dtype"] == {"distill": "bfloat16", "eval": "float32"}
    assert result["student"]["heldout_perplexity"] < result["pruned"]["heldout_perplexity"]
