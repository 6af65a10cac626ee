"""Mixture-of-experts models (Mixtral; Qwen3-MoE with query/key norms; Qwen2-MoE with QKV biases,
softmax-over-all routing and a gated shared expert) through config, bridge, layouts, importance and
surgery, each against an independent reference: transformers' own models (logits, routing), plain
indexing of transformers' tensors, TP=2 / PP=2 / EP=2 against TP=1, masked against pruned."""

from __future__ import annotations

import json
import math

import pytest
import torch
import transformers

from distributed import run_distributed
from nemo_minitron.errors import UserError
from nemo_minitron.models import bridge
from nemo_minitron.models.gpt import transformer_config
from nemo_minitron.models.hf_config import arch_from_hf, to_hf
from nemo_minitron.models.hf_io import read_hf_directory, write_hf_directory
from nemo_minitron.pruning import PruneIndices, PruneSpec, count_from_shapes, prune_global
from test_prune import logits_of, random_indices, random_subset, reference_prune_hf
from test_qwen import TOKENS, logits_and_weights
from tiny import global_weights, hf_model, tiny_moe_arch, tiny_tokenizer

FAMILIES = ("mixtral", "qwen3_moe", "qwen2_moe")


def teachers():
    """(arch, HF model) per family; Mixtral with tied embeddings."""
    return [(arch, hf_model(arch)) for arch in (tiny_moe_arch(f, tie=f == "mixtral") for f in FAMILIES)]


def hub_layout(tmp_path, arch, hf) -> dict[str, torch.Tensor]:
    """The model's weights as its files store them (one module per expert)."""
    hf.save_pretrained(str(tmp_path / arch.family))
    tiny_tokenizer(arch.vocab_size).save_pretrained(str(tmp_path / arch.family))
    return read_hf_directory(tmp_path / arch.family)[1]


# --- config and bridge ---------------------------------------------------------------------------

def _counts_on_meta(archs):
    from nemo_minitron.pruning import count_on_meta

    return [count_on_meta(arch) for arch in archs]


def test_hf_config_round_trip_counts_and_refusals():
    for family in FAMILIES:
        arch = tiny_moe_arch(family)
        config = to_hf(arch)
        assert config.model_type == family and arch_from_hf(config) == arch
        assert arch_from_hf(config.to_dict()) == arch
        counts = arch.num_parameters()
        assert {k: counts[k] for k in ("total", "non_embedding")} == count_from_shapes(arch)
        # one token runs through the router, top-2 of the 4 experts of 3 x 32 x 64 and the shared expert
        assert counts["total"] - counts["active"] == arch.num_layers * 2 * 3 * 32 * 64
    [meta] = run_distributed(_counts_on_meta, world_size=1, args=([tiny_moe_arch(f) for f in FAMILIES],))
    assert meta == [tiny_moe_arch(f).num_parameters()["total"] for f in FAMILIES]
    with pytest.raises(UserError, match="mlp_only_layers"):
        arch_from_hf({**to_hf(tiny_moe_arch()).to_dict(), "mlp_only_layers": [0]})
    with pytest.raises(UserError, match="moe_router_topk=5 exceeds model.num_moe_experts=4"):
        tiny_moe_arch(moe_router_topk=5)
    with pytest.raises(UserError, match="moe_shared_expert_intermediate_size is set but qwen3_moe has no shared"):
        tiny_moe_arch(moe_shared_expert_intermediate_size=8)
    with pytest.raises(UserError, match="model.num_moe_experts is set but model.family='llama' is dense"):
        tiny_moe_arch("qwen3_moe").replace(family="llama", qk_norm=False)
    with pytest.raises(UserError, match="moe_router_topk=1 with weights renormalised"):
        tiny_moe_arch("mixtral", moe_router_topk=1)
    with pytest.raises(UserError, match="ep=3 does not divide num_moe_experts=4"):
        tiny_moe_arch().check_parallel(1, 1, ep=3)


def test_hf_round_trip_is_exact_in_both_expert_layouts(tmp_path):
    """transformers 5 holds experts fused in memory and writes one module per expert to its files:
    both read to the same global weights, which go back to the files' tensors bit for bit."""
    for arch, hf in teachers():
        files = hub_layout(tmp_path, arch, hf)
        from_memory = bridge.hf_to_global(arch, hf.state_dict())
        from_files = bridge.hf_to_global(arch, files)
        assert from_memory.keys() == from_files.keys()
        assert all(torch.equal(from_memory[k], from_files[k]) for k in from_files)
        back = bridge.global_to_hf(arch, from_files)
        assert back.keys() == files.keys()
        assert all(torch.equal(back[k], files[k]) for k in files)
        shapes = bridge.checkpoint_shapes(arch)
        assert shapes["decoder.layers.mlp.experts.experts.linear_fc1.weight"] == (4, 4, 64, 64)
        assert shapes["decoder.layers.mlp.router.weight"] == (4, 4, 64)


@pytest.mark.parametrize("tp,pp,ep", [(1, 1, 1), pytest.param(2, 2, 1, marks=pytest.mark.slow),
                                      pytest.param(2, 1, 2, marks=pytest.mark.slow)])
def test_logits_match_transformers(tp, pp, ep):
    """All three families in one process group per layout; sharding then gathering is the identity."""
    cases, expected = [], []
    for arch, hf in teachers():
        cases.append((arch, bridge.hf_to_global(arch, hf.state_dict())))
        expected.append(hf(TOKENS).logits)
    ranks = run_distributed(logits_and_weights, world_size=tp * pp * ep, tp=tp, pp=pp, ep=ep, args=(cases,))
    for rank in ranks:
        for (arch, global_sd), reference, (logits, regathered, live_arch) in zip(cases, expected, rank):
            if logits is not None:
                torch.testing.assert_close(logits, reference, rtol=1e-5, atol=1e-5)
            assert live_arch == arch
            assert regathered.keys() == global_sd.keys()
            assert all(torch.equal(regathered[k], global_sd[k]) for k in global_sd)


def _save_at(arch, global_sd, path):
    from nemo_minitron import checkpoint
    from nemo_minitron.models.gpt import build_gpt_model

    model = build_gpt_model(arch)
    bridge.load_global(model, global_sd)
    checkpoint.save_checkpoint(model, path)


@pytest.mark.slow
def test_checkpoint_saved_at_ep2_loads_at_tp2_and_tp1(tmp_path):
    arch, hf = teachers()[2]  # Qwen2-MoE: routed and shared experts
    global_sd = bridge.hf_to_global(arch, hf.state_dict())
    run_distributed(_save_at, world_size=2, ep=2, args=(arch, global_sd, tmp_path / "ck"))
    for tp in (2, 1):
        [loaded] = run_distributed(global_weights, world_size=tp, tp=tp, args=(tmp_path / "ck",))[0]
        assert loaded.keys() == global_sd.keys()
        assert all(torch.equal(loaded[k], global_sd[k]) for k in global_sd), tp


# --- surgery -------------------------------------------------------------------------------------

def random_moe_indices(teacher, target, layers, seed=0) -> PruneIndices:
    """`random_indices` plus random kept experts, each with its own random neurons, and shared neurons."""
    g = torch.Generator().manual_seed(seed + 100)
    idx = random_indices(teacher.replace(ffn_hidden_size=teacher.moe_ffn_hidden_size),
                         target.replace(ffn_hidden_size=target.moe_ffn_hidden_size), layers, seed)
    idx.experts = {i: random_subset(teacher.num_moe_experts, target.num_moe_experts, g) for i in layers}
    idx.neurons = {i: torch.stack([random_subset(teacher.moe_ffn_hidden_size, target.moe_ffn_hidden_size, g)
                                   for _ in range(target.num_moe_experts)]) for i in layers}
    if teacher.moe_shared_expert_intermediate_size:
        idx.shared_neurons = {i: random_subset(teacher.moe_shared_expert_intermediate_size,
                                               target.moe_shared_expert_intermediate_size, g) for i in layers}
    return idx


def reference_prune_moe_hf(teacher, hub: dict[str, torch.Tensor], idx: PruneIndices) -> dict[str, torch.Tensor]:
    """Plain indexing of the files' tensors: attention, norms and embeddings as for a dense model;
    per layer the router rows of the kept experts, expert k' = kept expert k with its kept neurons
    (gate/up rows, down columns), the shared expert's kept neurons and its gate's hidden columns."""
    dense = {k: v for k, v in hub.items() if ".mlp." not in k and "block_sparse_moe" not in k}
    for i in idx.layers:  # placeholders for the dense MLP the dense reference indexes (and is dropped)
        dense |= {f"model.layers.{i}.mlp.up_proj.weight": torch.zeros(1, teacher.hidden_size),
                  f"model.layers.{i}.mlp.down_proj.weight": torch.zeros(teacher.hidden_size, 1)}
    out = {k: v for k, v in reference_prune_hf(teacher, dense, PruneIndices(
        hidden=idx.hidden, layers=idx.layers, heads=idx.heads, neurons={i: torch.tensor([0]) for i in idx.layers},
    )).items() if ".mlp." not in k}
    hid = idx.hidden
    mixtral = teacher.family == "mixtral"
    names = ("w1", "w3", "w2") if mixtral else ("gate_proj", "up_proj", "down_proj")
    for new, old in enumerate(idx.layers):
        src = f"model.layers.{old}." + ("block_sparse_moe." if mixtral else "mlp.")
        dst = f"model.layers.{new}." + ("block_sparse_moe." if mixtral else "mlp.")
        out[dst + "gate.weight"] = hub[src + "gate.weight"][idx.experts[old]][:, hid]
        for k, (e, n) in enumerate(zip(idx.experts[old].tolist(), idx.neurons[old])):
            for name in names[:2]:
                out[f"{dst}experts.{k}.{name}.weight"] = hub[f"{src}experts.{e}.{name}.weight"][n][:, hid]
            out[f"{dst}experts.{k}.{names[2]}.weight"] = hub[f"{src}experts.{e}.{names[2]}.weight"][hid][:, n]
        if teacher.moe_shared_expert_intermediate_size:
            n = idx.shared_neurons[old]
            for name in ("gate_proj", "up_proj"):
                out[f"{dst}shared_expert.{name}.weight"] = hub[f"{src}shared_expert.{name}.weight"][n][:, hid]
            out[f"{dst}shared_expert.down_proj.weight"] = hub[f"{src}shared_expert.down_proj.weight"][hid][:, n]
            out[f"{dst}shared_expert_gate.weight"] = hub[f"{src}shared_expert_gate.weight"][:, hid]
    return out


def test_surgery_equals_independent_hf_pruning(tmp_path):
    """Experts, expert FFN, shared FFN, hidden, heads and depth at once: the surgery equals plain
    indexing of the files' tensors, and the pruned megatron model computes what transformers
    computes from those weights written by export's writer."""
    spec = dict(num_layers=3, hidden_size=40, num_attention_heads=2, num_query_groups=1, num_moe_experts=3,
                moe_ffn_hidden_size=20)
    cases, references = [], []
    for seed, (teacher, hf) in enumerate(teachers()):
        shared = {"moe_shared_expert_intermediate_size": 30} if teacher.moe_shared_expert_intermediate_size else {}
        target = PruneSpec(**spec, **shared).target_arch(teacher)
        hub = hub_layout(tmp_path, teacher, hf)
        idx = random_moe_indices(teacher, target, [0, 2, 3], seed)
        pruned = prune_global(bridge.hf_to_global(teacher, hub), teacher, target, idx)
        expected = reference_prune_moe_hf(teacher, hub, idx)
        got = bridge.global_to_hf(target, pruned)
        assert got.keys() == expected.keys()
        assert all(torch.equal(got[k], expected[k]) for k in expected), teacher.family
        out = write_hf_directory(target, expected, tiny_tokenizer(target.vocab_size), tmp_path / f"{teacher.family}-pruned")
        student = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
        cases.append((target, pruned, ()))
        references.append(student(TOKENS).logits)
    [logits] = run_distributed(logits_of, world_size=1, args=(cases,))
    for got, reference in zip(logits, references):
        torch.testing.assert_close(got, reference, rtol=1e-5, atol=1e-5)


def test_masked_expert_neurons_equal_pruned_ones():
    """Zeroing the down-projection columns of an expert's (or the shared expert's) dropped neurons
    removes exactly their contribution: the same logits as the model without them."""
    teacher, hf = teachers()[2]
    sd = bridge.hf_to_global(teacher, hf.state_dict())
    target = PruneSpec(moe_ffn_hidden_size=20, moe_shared_expert_intermediate_size=30).target_arch(teacher)
    layers = list(range(teacher.num_layers))
    idx = random_moe_indices(teacher, target.replace(num_moe_experts=4), layers)
    idx.hidden = torch.arange(teacher.hidden_size)
    idx.heads = {i: torch.arange(4).view(2, 2) for i in layers}
    idx.experts = {i: torch.arange(4) for i in layers}
    masked = dict(sd)
    for i in layers:
        for e, kept in enumerate(idx.neurons[i]):
            name = f"decoder.layers.{i}.mlp.experts.local_experts.{e}.linear_fc2.weight"
            masked[name] = masked[name] * torch.isin(torch.arange(32), kept).float()
        name = f"decoder.layers.{i}.mlp.shared_experts.linear_fc2.weight"
        masked[name] = masked[name] * torch.isin(torch.arange(48), idx.shared_neurons[i]).float()
    [[unpruned, virtual, physical]] = run_distributed(logits_of, world_size=1, args=(
        [(teacher, sd, ()), (teacher, masked, ()), (target, prune_global(sd, teacher, target, idx), ())],))
    torch.testing.assert_close(physical, virtual, rtol=1e-5, atol=1e-5)
    assert (virtual - unpruned).abs().max() > 1e-3


def test_spec_refuses_what_an_moe_cannot_become():
    teacher = tiny_moe_arch("qwen3_moe")
    with pytest.raises(UserError, match="below the router's top-k"):
        PruneSpec(num_moe_experts=1).target_arch(teacher)
    with pytest.raises(UserError, match="target.ffn_hidden_size is not used"):
        PruneSpec(ffn_hidden_size=48).target_arch(teacher)
    with pytest.raises(UserError, match="has no shared expert"):
        PruneSpec(moe_shared_expert_intermediate_size=8).target_arch(teacher)
    with pytest.raises(UserError, match="has no mixture-of-experts layers"):
        PruneSpec(num_moe_experts=2).target_arch(teacher.replace(
            family="qwen3", num_moe_experts=None, moe_router_topk=None, moe_ffn_hidden_size=None))
    assert PruneSpec(moe_ffn_hidden_size=16).target_arch(tiny_moe_arch("mixtral")).ffn_hidden_size == 16


# --- importance ----------------------------------------------------------------------------------

def _scores(arch, global_sd, windows):
    """Activation scores, and the weights of the model pruned by them (2 experts of 16 neurons, shared 24)."""
    from nemo_minitron.importance import estimate_importance, perplexity_loop
    from nemo_minitron.models.gpt import build_gpt_model
    from nemo_minitron.pruning import prune_model, select_indices

    model = build_gpt_model(arch)
    bridge.load_global(model, global_sd)
    scores = estimate_importance(model, perplexity_loop(windows, micro_batch_size=2, progress=False))
    target = PruneSpec(num_moe_experts=2, moe_ffn_hidden_size=16, moe_shared_expert_intermediate_size=24,
                       hidden_size=48).target_arch(arch)
    pruned = prune_model(model, target, select_indices(scores, arch, target, []))
    return scores, bridge.gather_global(pruned)


def hf_routing(hf, arch, windows) -> tuple[torch.Tensor, torch.Tensor]:
    """[L, E] tokens routed to each expert and the routing weight it receives, from transformers'
    router logits: softmax, top-k, renormalised unless the weights are the softmax over all."""
    logits = hf(windows, output_router_logits=True).router_logits
    counts, mass = [], []
    for layer in logits:
        probs = layer.float().softmax(-1)
        top = probs.topk(arch.moe_router_topk, dim=-1)
        weights = top.values if arch.moe_router_pre_softmax else top.values / top.values.sum(-1, keepdim=True)
        counts.append(torch.zeros(arch.num_moe_experts).index_add_(0, top.indices.flatten(), torch.ones(top.indices.numel())))
        mass.append(torch.zeros(arch.num_moe_experts).index_add_(0, top.indices.flatten(), weights.flatten()))
    return torch.stack(counts), torch.stack(mass)


@pytest.mark.slow
@pytest.mark.parametrize("tp,ep", [(2, 1), (1, 2)])
def test_importance_equals_tp1_and_transformers_routing(tp, ep):
    """Expert, expert-neuron, shared-neuron, head and hidden scores at TP=2 (experts split over
    expert-TP) and at EP=2 equal TP=1, and so do the weights pruned by them; the token counts and
    routing weights equal transformers'."""
    windows = torch.randint(0, 320, (4, 16), generator=torch.Generator().manual_seed(2))
    arch, hf = teachers()[2]
    global_sd = bridge.hf_to_global(arch, hf.state_dict())
    [(reference, reference_pruned)] = run_distributed(_scores, world_size=1, args=(arch, global_sd, windows))
    counts, mass = hf_routing(hf, arch, windows[:, :-1])  # the loop predicts the last token of each window
    torch.testing.assert_close(reference.experts["frequency"], counts)
    torch.testing.assert_close(reference.experts["router_mass"], mass, rtol=1e-5, atol=1e-5)
    assert reference.experts["output"].min() > 0 and reference.shared_neurons.min() > 0
    for scores, pruned in run_distributed(_scores, world_size=tp * ep, tp=tp, ep=ep, args=(arch, global_sd, windows)):
        for name in ("hidden", "heads", "neurons", "shared_neurons"):
            torch.testing.assert_close(getattr(scores, name), getattr(reference, name), rtol=1e-5, atol=1e-6)
        for name, values in reference.experts.items():
            torch.testing.assert_close(scores.experts[name], values, rtol=1e-5, atol=1e-6)
        assert pruned.keys() == reference_pruned.keys()
        assert all(torch.equal(pruned[k], reference_pruned[k]) for k in pruned)  # the same units kept


# --- the command line ----------------------------------------------------------------------------

@pytest.mark.slow
def test_cli_import_prune_export_and_eval_agree_with_transformers(tmp_path):
    """A Qwen3-MoE directory imported, pruned to 3 experts of 16 neurons by activation importance,
    exported: transformers loads the export, and its perplexity on a text equals `minitron eval`'s
    on the pruned checkpoint."""
    from commands import last_json, minitron
    from nemo_minitron.data.indexed import load_token_stream
    from nemo_minitron.eval.perplexity import windows_from_stream
    from tiny import write_hf_dir, write_sentence_docs

    arch = tiny_moe_arch("qwen3_moe")
    write_hf_dir(tmp_path / "hf", arch)
    docs = write_sentence_docs(tmp_path / "docs.jsonl", 12)
    fp32 = "dtype=float32"
    minitron("import", f"hf_path={tmp_path / 'hf'}", f"output_dir={tmp_path / 'teacher'}", fp32)
    prune = minitron(
        "prune", f"checkpoint={tmp_path / 'teacher'}", f"output_dir={tmp_path / 'pruned'}", fp32,
        "target.num_moe_experts=3", "target.moe_ffn_hidden_size=16", f"calib.data={docs}", "calib.num_samples=8",
        "calib.seq_len=32", "loss_samples=4", "scores_cache=false", "reconstruct=true")
    pruned = last_json(prune)
    # the main job's reconstruct=true does not stop an MoE teacher: it prunes without it, saying so
    assert "reconstruction refits dense MLPs, attention and Mamba mixers, not mixtures of experts" in prune.stderr
    assert pruned["parameters"]["total"] == arch.replace(num_moe_experts=3, moe_ffn_hidden_size=16).num_parameters()["total"]
    report = json.loads((tmp_path / "pruned" / "report.json").read_text())
    assert report["experts"]["method"] == "output" and len(report["experts"]["kept"]["0"]) == 3
    assert "reconstruction" not in report
    minitron("export-hf", f"checkpoint={tmp_path / 'pruned'}", f"output_dir={tmp_path / 'export'}")
    ours = last_json(minitron("eval", f"checkpoint={tmp_path / 'pruned'}", f"data={docs}", "seq_len=32", fp32))

    student = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "export"), dtype=torch.float32).eval()
    assert student.config.num_experts == 3 and student.config.moe_intermediate_size == 16
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "export"))
    windows = windows_from_stream(load_token_stream(docs, tokenizer), 32)
    with torch.no_grad():
        logits = student(windows[:, :-1]).logits
    nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), windows[:, 1:].flatten())
    assert ours["perplexity"] == pytest.approx(math.exp(nll.item()), rel=1e-4)


# --- a real pretrained MoE: the embedded SmolLM2 split into experts -------------------------------

@pytest.mark.slow
def test_smollm2_split_into_experts_computes_the_dense_model(tmp_path):
    """SmolLM2-135M with every FFN split into 8 experts of 192 neurons (zero router, top-8, down
    projections x 8) computes the dense model: megatron's MoE logits and transformers' Mixtral of the
    exported weights both equal transformers' dense SmolLM2 on real text."""
    from nemo_minitron.models.gguf_import import embedded_gguf_path, load_gguf_llama
    from nemo_minitron.models.upcycle import split_into_experts

    try:
        gguf = load_gguf_llama(embedded_gguf_path())
    except FileNotFoundError as err:
        pytest.skip(str(err))
    dense_arch = arch_from_hf(gguf.config)
    dense = transformers.LlamaForCausalLM(gguf.config).eval()
    dense.load_state_dict(gguf.state_dict, strict=False)
    dense.tie_weights()
    tokens = gguf.tokenizer("It is a truth universally acknowledged, that a single man in possession of a good "
                            "fortune, must be in want of a wife.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        reference = dense(tokens).logits
    arch, global_sd = split_into_experts(dense_arch, bridge.hf_to_global(dense_arch, gguf.state_dict), 8)
    assert arch.family == "mixtral" and arch.moe_ffn_hidden_size == 192 and arch.moe_router_topk == 8
    [[ours]] = run_distributed(logits_of, world_size=1, args=([(arch, global_sd, ())], tokens))
    out = write_hf_directory(arch, bridge.global_to_hf(arch, global_sd), gguf.tokenizer, tmp_path / "mixtral")
    mixtral = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = mixtral(tokens).logits
    torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(theirs, reference, rtol=1e-4, atol=1e-4)
    with pytest.raises(UserError, match="qwen2 models cannot be split into experts"):
        split_into_experts(tiny_moe_arch("qwen3_moe").replace(family="qwen2", qkv_bias=True, qk_norm=False,
                           num_moe_experts=None, moe_router_topk=None, moe_ffn_hidden_size=None), {}, 2)


# --- distillation --------------------------------------------------------------------------------

def _distill_moe(out: str, sequence_parallel: bool = False):
    """Three distillation steps of a 2-expert Qwen2-MoE student from the 4-expert teacher (logit KL,
    LM loss and an intermediate loss); the losses and the student's weights after them."""
    from nemo_minitron.distill import DistillationLoss, DistillationModel, LayerPair, LogitLoss
    from nemo_minitron.models.gpt import build_gpt_model
    from nemo_minitron.train import OptimConfig, TokenWindows, TrainConfig, Trainer, TrainingData
    from test_distill import _stream

    teacher_arch = tiny_moe_arch("qwen2_moe")
    student_arch = teacher_arch.replace(num_layers=2, num_moe_experts=2, moe_ffn_hidden_size=16,
                                        moe_shared_expert_intermediate_size=24)
    teacher, student = (build_gpt_model(arch, torch.float32, sequence_parallel=sequence_parallel)
                        for arch in (teacher_arch, student_arch))
    bridge.load_global(teacher, bridge.hf_to_global(teacher_arch, hf_model(teacher_arch, 0).state_dict()))
    bridge.load_global(student, bridge.hf_to_global(student_arch, hf_model(student_arch, 1).state_dict()))
    data = TrainingData(TokenWindows(_stream(), 16, seed=0), TokenWindows(_stream()[7:], 16, seed=1))
    trainer = Trainer(
        DistillationModel(student, teacher, (LayerPair(0, 1), LayerPair(1, 3))),
        DistillationLoss(LogitLoss("fwd_kl", lm_weight=0.2)), data,
        TrainConfig(steps=3, global_batch_size=4, seq_length=16, micro_batch_size=1, eval_batches=1),
        OptimConfig(lr=1e-2, min_lr=1e-3, warmup_steps=1), out, export_model=student)
    # the gradient norm too: Adam's steps hardly change when a gradient is scaled (e.g. by TP)
    losses = [[m["train/loss"], m["train/grad_norm"]] for m in (trainer.train_step() for _ in range(3))]
    return losses, bridge.gather_global(student)


@pytest.mark.slow
def test_distillation_at_ep2_and_sequence_parallel_tp2_equals_tp1(tmp_path):
    """EP=2 (two data-parallel ranks, each holding half of every layer's experts) and TP=2 with
    sequence parallelism (each TP rank routes its half of every sequence; experts, norms and the
    shared expert's gate summed over TP) train as one process does; TP=2 without sequence
    parallelism is refused. PP needs nothing MoE-specific (the logits and importance tests cover MoE
    stages)."""
    [(reference, weights)] = run_distributed(_distill_moe, world_size=1, args=(str(tmp_path / "tp1"),))
    assert reference[-1][0] < reference[0][0]
    ep2 = run_distributed(_distill_moe, world_size=2, ep=2, args=(str(tmp_path / "ep2"),))
    tp2 = run_distributed(_distill_moe, world_size=2, tp=2, args=(str(tmp_path / "tp2"), True))
    for losses, trained in ep2 + tp2:
        torch.testing.assert_close(torch.tensor(losses), torch.tensor(reference), rtol=1e-5, atol=1e-6)
        for key, tensor in weights.items():
            # Adam at lr 1e-2 moves a weight whose gradient is near zero by up to the lr whatever
            # the gradient's rounding: 1e-4 as in test_distill's TP and PP comparisons
            torch.testing.assert_close(trained[key], tensor, rtol=0, atol=1e-4, msg=lambda m, key=key: f"{key}: {m}")
    with pytest.raises(RuntimeError, match="training a mixture-of-experts model at tp=2 needs sequence parallelism"):
        run_distributed(_distill_moe, world_size=2, tp=2, args=(str(tmp_path / "refused"),))


def _prune_in_place(arch, global_sd, windows):
    """The one-call API on a live MoE model, against the surgery of the indices its scores select."""
    import nemo_minitron as mt
    from nemo_minitron.importance import perplexity_loop
    from nemo_minitron.models.gpt import build_gpt_model
    from nemo_minitron.pruning import select_indices

    model = build_gpt_model(arch)
    bridge.load_global(model, global_sd)
    scores = mt.estimate_importance(model, perplexity_loop(windows, micro_batch_size=2, progress=False))
    config = mt.prune(model, scores, num_moe_experts=2, moe_ffn_hidden_size=16, moe_router_topk=1,
                      expert_method="router_mass")
    target = PruneSpec(num_moe_experts=2, moe_ffn_hidden_size=16, moe_router_topk=1).target_arch(arch)
    indices = select_indices(scores, arch, target, [], "router_mass")
    expected = prune_global(global_sd, arch, target, indices)
    return ((config.num_moe_experts, config.moe_ffn_hidden_size, config.moe_router_topk), mt.arch_of(model) == target,
            [torch.equal(t, expected[k]) for k, t in bridge.gather_global(model).items()],
            [e.tolist() for e in indices.experts.values()], scores.experts["router_mass"].argsort(dim=1, descending=True))


def test_one_call_prune_of_a_live_moe_model():
    arch, hf = teachers()[2]  # weights from the softmax over all experts: top-1 is allowed
    windows = torch.randint(0, 320, (4, 16), generator=torch.Generator().manual_seed(3))
    [(sizes, same_arch, equal, kept, ranking)] = run_distributed(
        _prune_in_place, world_size=1, args=(arch, bridge.hf_to_global(arch, hf.state_dict()), windows))
    assert sizes == (2, 16, 1) and same_arch and all(equal)
    assert kept == [sorted(row[:2].tolist()) for row in ranking]  # the two with the most routing weight


def test_moe_checkpoint_keys_do_not_depend_on_the_layer_spec():
    """Transformer Engine's MoE layers keep the pre-MLP norm as its own module, which megatron saves
    as `pre_mlp_layernorm.weight` (the local spec maps it to the fused-norm key): `portable_norm_keys`
    maps it too. Checked on the local MoE spec with megatron's mapping removed, TE's situation."""
    [keys] = run_distributed(_pre_mlp_norm_keys, world_size=1, args=(tiny_moe_arch("mixtral"),))
    assert keys == (["decoder.layers.mlp.linear_fc1.layer_norm_weight"], ["decoder.layers.pre_mlp_layernorm.weight"])


def _pre_mlp_norm_keys(arch):
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from nemo_minitron.models.gpt import portable_norm_keys

    keys = []
    for fix in (True, False):
        spec = get_gpt_layer_local_spec(num_experts=arch.num_moe_experts, normalization="RMSNorm")
        spec.submodules.sharded_state_dict_keys_map = {"input_layernorm.": "self_attention.linear_qkv.layer_norm_"}
        model = GPTModel(config=transformer_config(arch), transformer_layer_spec=portable_norm_keys(spec) if fix else spec,
                         vocab_size=arch.vocab_size, max_sequence_length=arch.max_position_embeddings,
                         position_embedding_type="rope")
        keys.append(sorted({t.key for name, t in model.sharded_state_dict().items() if "pre_mlp_layernorm" in name}))
    return tuple(keys)
