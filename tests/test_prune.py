"""Pruning surgery: equal to an independent pruning of the HF model; scores and pruned weights equal
at every TP x PP x DP layout; physically pruned == virtually pruned (masked / skipped) models;
PruneSpec validation and the planner's parameter counts."""

from __future__ import annotations

import pytest
import torch

from distributed import run_distributed
from nemo_minitron.importance import Aggregation
from nemo_minitron.models import bridge
from nemo_minitron.pruning import PruneIndices, PruneSpec, prune_global
from nemo_minitron.pruning.surgery import merge_pruned_heads
from tiny import hf_model, tiny_arch

TOKENS = torch.randint(0, 320, (2, 12), generator=torch.Generator().manual_seed(0))
WINDOWS = torch.randint(0, 320, (8, 17), generator=torch.Generator().manual_seed(1))


def random_subset(n: int, k: int, g: torch.Generator) -> torch.Tensor:
    return torch.randperm(n, generator=g)[:k].sort().values


def random_indices(teacher, target, layers: list[int], seed: int = 0) -> PruneIndices:
    """Arbitrary index sets of the target's sizes (whole groups and heads within groups)."""
    g = torch.Generator().manual_seed(seed)
    per_group = teacher.num_attention_heads // teacher.num_query_groups
    keep = target.num_attention_heads // target.num_query_groups

    def heads() -> torch.Tensor:
        groups = random_subset(teacher.num_query_groups, target.num_query_groups, g)
        return torch.stack([grp * per_group + random_subset(per_group, keep, g) for grp in groups.tolist()])

    return PruneIndices(
        hidden=random_subset(teacher.hidden_size, target.hidden_size, g),
        layers=layers,
        heads={i: heads() for i in layers},
        neurons={i: random_subset(teacher.ffn_hidden_size, target.ffn_hidden_size, g) for i in layers},
    )


def reference_prune_hf(teacher, hf: dict[str, torch.Tensor], idx: PruneIndices) -> dict[str, torch.Tensor]:
    """Plain tensor indexing of transformers' Llama / Nemotron / Qwen state dict, written independently
    of the surgery (Nemotron: norms with biases, an MLP of up_proj and down_proj only; Qwen2: q/k/v
    biases, indexed like their weights' rows; Qwen3: q_norm / k_norm over head_dim, kept whole)."""
    hid, d = idx.hidden, teacher.kv_channels
    per_group = teacher.num_attention_heads // teacher.num_query_groups
    out = {"model.embed_tokens.weight": hf["model.embed_tokens.weight"][:, hid]}
    out |= {name: hf[name][hid] for name in hf if name.startswith("model.norm.")}
    if not teacher.tie_embeddings:
        out["lm_head.weight"] = hf["lm_head.weight"][:, hid]
    for new, old in enumerate(idx.layers):
        src, dst = f"model.layers.{old}.", f"model.layers.{new}."
        heads = idx.heads[old].flatten()
        groups = idx.heads[old][:, 0] // per_group
        q_rows = torch.cat([torch.arange(h * d, (h + 1) * d) for h in heads.tolist()])
        kv_rows = torch.cat([torch.arange(grp * d, (grp + 1) * d) for grp in groups.tolist()])
        o_cols = q_rows
        n = idx.neurons[old]
        for name in hf:
            if name.startswith((src + "input_layernorm.", src + "post_attention_layernorm.")):
                out[dst + name[len(src):]] = hf[name][hid]
        out[dst + "self_attn.q_proj.weight"] = hf[src + "self_attn.q_proj.weight"][q_rows][:, hid]
        out[dst + "self_attn.k_proj.weight"] = hf[src + "self_attn.k_proj.weight"][kv_rows][:, hid]
        out[dst + "self_attn.v_proj.weight"] = hf[src + "self_attn.v_proj.weight"][kv_rows][:, hid]
        out[dst + "self_attn.o_proj.weight"] = hf[src + "self_attn.o_proj.weight"][hid][:, o_cols]
        if src + "self_attn.q_proj.bias" in hf:
            out[dst + "self_attn.q_proj.bias"] = hf[src + "self_attn.q_proj.bias"][q_rows]
            out[dst + "self_attn.k_proj.bias"] = hf[src + "self_attn.k_proj.bias"][kv_rows]
            out[dst + "self_attn.v_proj.bias"] = hf[src + "self_attn.v_proj.bias"][kv_rows]
        for norm in ("q_norm", "k_norm"):
            if f"{src}self_attn.{norm}.weight" in hf:
                out[f"{dst}self_attn.{norm}.weight"] = hf[f"{src}self_attn.{norm}.weight"]
        if src + "mlp.gate_proj.weight" in hf:
            out[dst + "mlp.gate_proj.weight"] = hf[src + "mlp.gate_proj.weight"][n][:, hid]
        out[dst + "mlp.up_proj.weight"] = hf[src + "mlp.up_proj.weight"][n][:, hid]
        out[dst + "mlp.down_proj.weight"] = hf[src + "mlp.down_proj.weight"][hid][:, n]
    return out


def megatron_logits(arch, global_sd, tokens=TOKENS, skip=()):
    from nemo_minitron.importance import skip_layers
    from nemo_minitron.models.gpt import build_gpt_model
    from nemo_minitron.models.runner import forward_microbatches, gather_vocab_parallel

    model = build_gpt_model(arch)
    bridge.load_global(model, global_sd)
    with skip_layers(model, skip):
        out = forward_microbatches(model, [{"tokens": tokens}], lambda logits, _: gather_vocab_parallel(logits))
    return out[0] if out else None


def logits_of(cases, tokens=TOKENS):
    """Megatron logits for each (arch, global_sd, skip) case, in one process."""
    return [megatron_logits(arch, sd, tokens, skip) for arch, sd, skip in cases]


# --- the HF reference --------------------------------------------------------------------------

@pytest.mark.parametrize("tie,family", [(True, "llama"), (False, "llama"), (False, "nemotron")])
def test_surgery_equals_independent_hf_pruning(tie, family):
    teacher = tiny_arch(tie=tie, num_layers=4, family=family)
    hf = hf_model(teacher)
    spec = PruneSpec(num_layers=3, hidden_size=40, ffn_hidden_size=50, num_attention_heads=2, num_query_groups=1)
    target = spec.target_arch(teacher)
    idx = random_indices(teacher, target, layers=[0, 2, 3], seed=int(tie))
    pruned = prune_global(bridge.hf_to_global(teacher, hf.state_dict()), teacher, target, idx)
    expected = reference_prune_hf(teacher, hf.state_dict(), idx)
    got = bridge.global_to_hf(target, pruned)
    assert got.keys() == expected.keys()
    for name, tensor in expected.items():
        if family == "nemotron" and name.endswith("norm.weight"):  # HF gamma + 1 - 1: one ulp of 1.0
            torch.testing.assert_close(got[name], tensor, rtol=0, atol=2.0**-23)
        else:
            assert torch.equal(got[name], tensor), name

    # and the pruned megatron model computes what transformers computes with those weights
    student = hf_model(target)
    student.load_state_dict(expected, strict=False)
    [[logits]] = run_distributed(logits_of, world_size=1, args=([(target, pruned, ())],))
    torch.testing.assert_close(logits, student(TOKENS).logits, rtol=1e-5, atol=1e-5)


# --- virtual == physical -----------------------------------------------------------------------

def _full(teacher) -> PruneIndices:
    per_group = teacher.num_attention_heads // teacher.num_query_groups
    layers = list(range(teacher.num_layers))
    heads = torch.arange(teacher.num_attention_heads).view(-1, per_group)
    return PruneIndices(hidden=torch.arange(teacher.hidden_size), layers=layers, heads={i: heads for i in layers},
                        neurons={i: torch.arange(teacher.ffn_hidden_size) for i in layers})


def test_masked_and_skipped_models_equal_pruned_models():
    teacher = tiny_arch(tie=False)
    sd = bridge.hf_to_global(teacher, hf_model(teacher).state_dict())
    g = torch.Generator().manual_seed(5)
    cases = []

    # MLP neurons: zeroing a neuron's fc2 column removes exactly its contribution
    target = teacher.replace(ffn_hidden_size=60)
    idx = _full(teacher)
    idx.neurons = {i: random_subset(96, 60, g) for i in idx.layers}
    masked = dict(sd)
    for i, kept in idx.neurons.items():
        w = masked[f"decoder.layers.{i}.mlp.linear_fc2.weight"].clone()
        w[:, [j for j in range(96) if j not in kept.tolist()]] = 0
        masked[f"decoder.layers.{i}.mlp.linear_fc2.weight"] = w
    cases += [(teacher, masked, ()), (target, prune_global(sd, teacher, target, idx), ())]

    # heads within groups, and a whole query group: zero the heads' linear_proj columns
    for heads, groups in [(2, 2), (2, 1)]:
        target = PruneSpec(num_attention_heads=heads, num_query_groups=groups).target_arch(teacher)
        idx = random_indices(teacher, target, list(range(4)), seed=heads + groups)
        idx.hidden, idx.neurons = _full(teacher).hidden, _full(teacher).neurons
        masked = dict(sd)
        for i, kept in idx.heads.items():
            w = masked[f"decoder.layers.{i}.self_attention.linear_proj.weight"].clone().view(64, 4, 24)
            w[:, [h for h in range(4) if h not in kept.flatten().tolist()]] = 0
            masked[f"decoder.layers.{i}.self_attention.linear_proj.weight"] = w.view(64, 96)
        cases += [(teacher, masked, ()), (target, prune_global(sd, teacher, target, idx), ())]

    # depth: skipping layers 1 and 2 == the model without them
    target = teacher.replace(num_layers=2)
    idx = _full(teacher)
    idx.layers = [0, 3]
    cases += [(teacher, sd, (1, 2)), (target, prune_global(sd, teacher, target, idx), ())]

    [logits] = run_distributed(logits_of, world_size=1, args=(cases,))
    for virtual, physical in zip(logits[::2], logits[1::2]):
        torch.testing.assert_close(physical, virtual, rtol=1e-5, atol=1e-5)
    # every case really changed the model (a test that cannot fail would not show anything)
    [[unpruned]] = run_distributed(logits_of, world_size=1, args=([(teacher, sd, ())],))
    for virtual in logits[::2]:
        assert (virtual - unpruned).abs().max() > 1e-3


def test_head_residual_keeps_a_duplicate_heads_contribution():
    """A head whose queries equal another head's of the same group has the same attention
    output; pruning it with the residual merge leaves the model's function unchanged."""
    teacher = tiny_arch(tie=True)
    sd = bridge.hf_to_global(teacher, hf_model(teacher).state_dict())
    for i in range(teacher.num_layers):
        # group-major rows of 24: group 0 = [q0, q1, k, v], group 1 = [q2, q3, k, v]; q1 := q0, q3 := q2
        qkv = sd[f"decoder.layers.{i}.self_attention.linear_qkv.weight"].clone()
        qkv[24:48], qkv[120:144] = qkv[0:24], qkv[96:120]
        sd[f"decoder.layers.{i}.self_attention.linear_qkv.weight"] = qkv
    target = teacher.replace(num_attention_heads=2)
    idx = _full(teacher)
    idx.heads = {i: torch.tensor([[0], [2]]) for i in idx.layers}
    merged = prune_global(sd, teacher, target, idx, head_residual=True)
    plain = prune_global(sd, teacher, target, idx, head_residual=False)
    [[original, with_residual, without]] = run_distributed(
        logits_of, world_size=1, args=([(teacher, sd, ()), (target, merged, ()), (target, plain, ())],)
    )
    torch.testing.assert_close(with_residual, original, rtol=1e-5, atol=1e-5)
    assert (without - original).abs().max() > 1e-3


def test_merge_pruned_heads_pairs_within_groups():
    proj = torch.arange(2 * 6 * 1, dtype=torch.float32).view(2, 6, 1)  # [h=2, heads=6, d=1]
    kept = torch.tensor([[0], [4]])  # group 0 = heads 0-2 keeps 0; group 1 = heads 3-5 keeps 4
    merged = merge_pruned_heads(proj, kept, per_group=3)
    torch.testing.assert_close(merged[:, 0], proj[:, 0] + proj[:, 1] + proj[:, 2])
    torch.testing.assert_close(merged[:, 4], proj[:, 3] + proj[:, 4] + proj[:, 5])


# --- every layout gives the same scores and the same pruned weights ----------------------------

AGGREGATIONS = [Aggregation(), Aggregation(seq="l2", batch="var", heads="input"), Aggregation(seq="var", batch="mean")]


def scores_and_pruned(teacher, global_sd, target):
    from nemo_minitron.importance import activation_loop, contiguous_block_scores, estimate_importance, layer_loss_scores, loss_metric
    from nemo_minitron.models.gpt import build_gpt_model
    from nemo_minitron.pruning import lowest_layers, prune_model, select_indices

    model = build_gpt_model(teacher)
    bridge.load_global(model, global_sd)
    all_scores = [estimate_importance(model, activation_loop(WINDOWS, 2, progress=False), agg) for agg in AGGREGATIONS]
    metric = loss_metric(WINDOWS[:4], micro_batch_size=2)
    layer_loss, _ = layer_loss_scores(model, metric)
    blocks = contiguous_block_scores(model, 2, metric)
    scores = all_scores[0]
    indices = select_indices(scores, teacher, target, lowest_layers(scores.layers["block_importance"], 2))
    pruned = prune_model(model, target, indices)
    flat = [{"hidden": s.hidden, "heads": s.heads, "neurons": s.neurons, "bi": s.layers["block_importance"],
             "per_layer": s.hidden_per_layer} for s in all_scores]
    return flat, layer_loss, blocks, bridge.gather_global(pruned)


def _layout_reference(family: str):
    teacher = tiny_arch(tie=family == "llama", family=family)
    sd = bridge.hf_to_global(teacher, hf_model(teacher).state_dict())
    spec = PruneSpec(num_layers=2, hidden_size=48, ffn_hidden_size=64, num_attention_heads=2)
    target = spec.target_arch(teacher, tp=2, pp=2)
    [reference] = run_distributed(scores_and_pruned, world_size=1, args=(teacher, sd, target))
    return teacher, sd, target, reference


@pytest.fixture(scope="module")
def layout_reference():
    return _layout_reference("llama")


@pytest.mark.slow
@pytest.mark.parametrize("tp,pp,world", [(2, 1, 2), (1, 2, 2), (2, 2, 4), (1, 1, 2)])
def test_scores_and_pruned_weights_match_across_layouts(layout_reference, tp, pp, world):
    _check_layout(layout_reference, tp, pp, world)


@pytest.mark.slow
def test_nemotron_scores_and_pruned_weights_match_at_tp2_pp2():
    """LayerNorm biases and the unstrided squared-ReLU fc1 shard and prune like TP=1."""
    _check_layout(_layout_reference("nemotron"), 2, 2, 4)


def _check_layout(reference, tp: int, pp: int, world: int) -> None:
    teacher, sd, target, (ref_scores, ref_loss, ref_blocks, ref_pruned) = reference
    for flat, layer_loss, blocks, pruned in run_distributed(scores_and_pruned, world, tp, pp, (teacher, sd, target)):
        for got, expected in zip(flat, ref_scores):
            for name in expected:
                torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-6, msg=name)
        torch.testing.assert_close(layer_loss, ref_loss, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(blocks, ref_blocks, rtol=1e-5, atol=1e-5)
        assert pruned.keys() == ref_pruned.keys()
        for name, tensor in ref_pruned.items():
            assert torch.equal(pruned[name], tensor), name


# --- spec validation and parameter counts ------------------------------------------------------

@pytest.mark.parametrize("spec,tp,pp,message", [
    (PruneSpec(hidden_size=100), 1, 1, r"target\.hidden_size=100 must be between 1 and the teacher's 64"),
    (PruneSpec(num_attention_heads=3), 1, 1,
     r"target\.num_attention_heads=3 is not a multiple of target\.num_query_groups=2"),
    (PruneSpec(num_attention_heads=4, num_query_groups=1), 1, 1, r"needs 4 heads per group.*have 2"),
    (PruneSpec(num_query_groups=1), 2, 1, r"target\.num_query_groups=1 is not divisible by tp=2"),
    (PruneSpec(ffn_hidden_size=63), 2, 1, r"target\.ffn_hidden_size=63 is not divisible by tp=2"),
    (PruneSpec(num_layers=3), 1, 2, r"target\.num_layers=3 is not divisible by pp=2"),
    (PruneSpec(drop_layers=[0, 4]), 1, 1, r"target\.drop_layers has layers \[4\] outside 0\.\.3"),
    (PruneSpec(drop_layers=[1, 1]), 1, 1, r"lists a layer twice"),
    (PruneSpec(num_layers=3, drop_layers=[0, 1]), 1, 1, r"target\.num_layers=3 disagrees with target\.drop_layers"),
])
def test_spec_errors_name_the_key(spec, tp, pp, message):
    with pytest.raises(ValueError, match=message):
        spec.target_arch(tiny_arch(), tp, pp)


def test_spec_defaults_keep_the_teacher():
    teacher = tiny_arch()
    assert PruneSpec().target_arch(teacher) == teacher
    assert PruneSpec(num_query_groups=1).target_arch(teacher).num_attention_heads == 2  # heads per group kept
    assert PruneSpec(drop_layers=[3, 0]).target_arch(teacher).num_layers == 2
    with pytest.raises(ValueError, match=r"unknown target keys \['hidden'\]"):
        PruneSpec.from_dict({"hidden": 3})
