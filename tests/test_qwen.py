"""Qwen2 / Qwen2.5 (q, k, v biases) and Qwen3 (per-head query/key RMSNorms, head_dim set apart from
hidden / heads) through every stage: config, logits equal transformers' own models at TP=1 and TP=2 x
PP=2, the HF round trip, pruning surgery against an independent pruning of the HF weights (and
masked == physically pruned heads), HF export, and parameter counts."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import transformers

from distributed import run_distributed
from nemo_minitron.errors import UserError
from nemo_minitron.models import bridge
from nemo_minitron.models.config import ModelArch
from nemo_minitron.models.gpt import transformer_config
from nemo_minitron.models.hf_config import arch_from_hf, to_hf
from nemo_minitron.pruning import PUBLISHED_TEACHERS, PruneSpec, count_from_shapes, prune_global
from test_prune import logits_of, random_indices, reference_prune_hf
from tiny import hf_model, tiny_arch

TOKENS = torch.randint(0, 320, (2, 12), generator=torch.Generator().manual_seed(0))
FAMILIES = ("qwen2", "qwen3")


def logits_and_weights(cases):
    """Per (arch, global_sd): megatron logits (None off the last stage), the regathered global
    state dict and `arch_of` the live model, all in one process group."""
    from nemo_minitron.models.gpt import arch_of, build_gpt_model
    from nemo_minitron.models.runner import forward_microbatches, gather_vocab_parallel

    results = []
    for arch, global_sd in cases:
        model = build_gpt_model(arch)
        bridge.load_global(model, global_sd)
        out = forward_microbatches(
            model, [{"tokens": TOKENS[:1]}, {"tokens": TOKENS[1:]}], lambda logits, _: gather_vocab_parallel(logits)
        )
        results.append(((torch.cat(out) if out else None), bridge.gather_global(model), arch_of(model)))
    return results


# --- config ------------------------------------------------------------------------------------

def test_hf_config_round_trip_and_family_features():
    for family, extras in (("qwen2", {"qkv_bias": True, "qk_norm": False}),
                           ("qwen3", {"qkv_bias": False, "qk_norm": True})):
        arch = tiny_arch(tie=False, family=family)
        assert {"qkv_bias": arch.qkv_bias, "qk_norm": arch.qk_norm} == extras
        config = to_hf(arch)
        assert config.model_type == family and config.architectures == [f"Qwen{family[-1]}ForCausalLM"]
        assert config.sliding_window is None and config.head_dim == arch.kv_channels
        assert arch_from_hf(config) == arch
        assert ModelArch.from_dict(dataclass_dict(arch)) == arch
    with pytest.raises(UserError, match=r"model\.qkv_bias=False does not fit model\.family='qwen2'"):
        tiny_arch(family="qwen2", qkv_bias=False)
    with pytest.raises(UserError, match=r"model\.qk_norm=True does not fit model\.family='llama'"):
        tiny_arch(family="llama", qk_norm=True)
    with pytest.raises(UserError, match=r"qkv_bias='yes' is not of type bool"):
        ModelArch.from_dict({**dataclass_dict(tiny_arch()), "qkv_bias": "yes"})
    old = {k: v for k, v in dataclass_dict(tiny_arch()).items() if k not in ("qkv_bias", "qk_norm")}
    assert ModelArch.from_dict(old) == tiny_arch()  # model_config.json files written before these keys


def dataclass_dict(arch):
    return dataclasses.asdict(arch)


def test_sliding_window_refused_only_where_a_layer_uses_it():
    common = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=320, max_position_embeddings=32768)
    # the published Qwen2.5 / Qwen3 configs: a window set but switched off
    off = transformers.Qwen2Config(**common, use_sliding_window=False, sliding_window=4096).to_dict()
    off |= {"sliding_window": 4096}  # as config.json files write it (transformers' object nulls it)
    assert arch_from_hf(off).qkv_bias
    on = transformers.Qwen3Config(**common, head_dim=24, use_sliding_window=True, sliding_window=4096,
                                  max_window_layers=2)
    with pytest.raises(UserError, match="sliding_window=4096 is shorter than max_position_embeddings=32768"):
        arch_from_hf(on)
    below = transformers.Qwen3Config(**common, head_dim=24, use_sliding_window=True, sliding_window=4096,
                                     max_window_layers=4)  # no layer from max_window_layers on: no window
    assert arch_from_hf(below).qk_norm
    raw = {k: v for k, v in on.to_dict().items() if k != "layer_types"}  # an older config.json
    with pytest.raises(UserError, match="sliding_window=4096"):
        arch_from_hf(raw)
    with pytest.raises(UserError, match="attention_bias"):
        arch_from_hf(transformers.Qwen3Config(**common, head_dim=24, attention_bias=True))


# --- bridge ------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_hf_roundtrip_exact_and_qkv_bias_is_group_major(family):
    arch = tiny_arch(tie=False, family=family)
    hf_sd = hf_model(arch).state_dict()
    global_sd = bridge.hf_to_global(arch, hf_sd)
    back = bridge.global_to_hf(arch, global_sd)
    assert back.keys() == {k for k in hf_sd if "rotary" not in k}
    for name, tensor in back.items():
        assert torch.equal(tensor, hf_sd[name]), name
    d = arch.kv_channels  # 2 groups of 2 heads: per group [q heads 2g, 2g + 1; k head g; v head g]
    for i in range(arch.num_layers):
        h, m = f"model.layers.{i}.self_attn.", f"decoder.layers.{i}.self_attention."
        if family == "qwen2":
            q, k, v = (hf_sd[f"{h}{p}_proj.bias"].view(-1, d) for p in "qkv")
            expected = torch.cat([q[0], q[1], k[0], v[0], q[2], q[3], k[1], v[1]])
            assert torch.equal(global_sd[m + "linear_qkv.bias"], expected)
        else:
            assert torch.equal(global_sd[m + "q_layernorm.weight"], hf_sd[h + "q_norm.weight"])
            assert torch.equal(global_sd[m + "k_layernorm.weight"], hf_sd[h + "k_norm.weight"])
    shapes = bridge.checkpoint_shapes(arch)
    if family == "qwen2":
        assert shapes["decoder.layers.self_attention.linear_qkv.bias"] == (4, arch.qkv_rows)
    else:
        assert shapes["decoder.layers.self_attention.q_layernorm.weight"] == (4, d)


@pytest.mark.parametrize("tp,pp", [(1, 1), pytest.param(2, 2, marks=pytest.mark.slow)])
def test_logits_match_transformers(tp, pp):
    """Both families, tied and untied embeddings, in one process group per layout (TP=2 x PP=2:
    QKV biases and q/k norms sharded across TP on both pipeline stages)."""
    archs = [tiny_arch(tie=(tp == 1) == (family == "qwen2"), family=family) for family in FAMILIES]
    assert_logits_match_transformers([(arch, hf_model(arch)) for arch in archs], tp, pp)


def assert_logits_match_transformers(models, tp: int, pp: int) -> None:
    """For each (arch, HF model): the megatron model at TP x PP (one process group) computes the HF
    logits, `arch_of` reads `arch` back, and gathering the shards gives the loaded weights exactly."""
    cases = [(arch, bridge.hf_to_global(arch, hf.state_dict())) for arch, hf in models]
    expected = [hf(TOKENS).logits for _, hf in models]
    for rank in run_distributed(logits_and_weights, world_size=tp * pp, tp=tp, pp=pp, args=(cases,)):
        for (arch, global_sd), reference, (logits, regathered, live_arch) in zip(cases, expected, rank):
            if logits is not None:
                torch.testing.assert_close(logits, reference, rtol=1e-5, atol=1e-5)
            assert live_arch == arch
            assert regathered.keys() == global_sd.keys()  # sharding then gathering is the identity
            for name, tensor in global_sd.items():
                assert torch.equal(regathered[name], tensor), name


def test_arch_of_reads_a_callers_model_and_refuses_mismatched_qk_norms():
    [result] = run_distributed(_callers_models, world_size=1)
    assert result[:2] == ["qwen2", "qwen3"]
    assert "qk_layernorm=True but the layer spec's q_layernorm is IdentityOp" in result[2]
    assert "add_qkv_bias=True, qk_layernorm=True, num_moe_experts=None" in result[3]


def _callers_models():
    """GPTModels built the megatron way (no identity remembered): the family comes from the layers."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from nemo_minitron.models.gpt import arch_of

    def build(arch, qk_layernorm_spec, **config_changes):
        spec = get_gpt_layer_local_spec(normalization="RMSNorm", qk_layernorm=qk_layernorm_spec)
        config = dataclasses.replace(transformer_config(arch), **config_changes)
        return GPTModel(config=config, transformer_layer_spec=spec, vocab_size=arch.vocab_size,
                        max_sequence_length=arch.max_position_embeddings, position_embedding_type="rope")

    families = [arch_of(build(tiny_arch(family=f), f == "qwen3")).family for f in FAMILIES]
    errors = []
    for spec_norms, changes in ((False, {}), (True, {"add_qkv_bias": True})):  # a spec without norms; both extras
        try:
            arch_of(build(tiny_arch(family="qwen3"), spec_norms, **changes))
        except UserError as err:
            errors.append(str(err))
    return [*families, *errors]


# --- pruning -----------------------------------------------------------------------------------

def test_surgery_equals_independent_hf_pruning():
    """Heads (within groups and whole groups), FFN, hidden and depth at once: the surgery's weights
    equal plain indexing of transformers' tensors (a head's q/k/v bias rows go with it, the q/k norms
    stay whole), and the pruned megatron model computes what transformers' model of those weights does."""
    cases, students = [], []
    for seed, family in enumerate(FAMILIES):
        teacher = tiny_arch(tie=family == "qwen3", family=family)
        hf = hf_model(teacher)
        spec = PruneSpec(num_layers=3, hidden_size=40, ffn_hidden_size=50, num_attention_heads=2, num_query_groups=1)
        target = spec.target_arch(teacher)
        idx = random_indices(teacher, target, layers=[0, 2, 3], seed=seed)
        pruned = prune_global(bridge.hf_to_global(teacher, hf.state_dict()), teacher, target, idx)
        expected = reference_prune_hf(teacher, hf.state_dict(), idx)
        got = bridge.global_to_hf(target, pruned)
        assert got.keys() == expected.keys()
        for name, tensor in expected.items():
            assert torch.equal(got[name], tensor), name
        student = hf_model(target)
        student.load_state_dict(expected, strict=False)
        cases.append((target, pruned, ()))
        students.append(student(TOKENS).logits)
    [logits] = run_distributed(logits_of, world_size=1, args=(cases,))
    for got, reference in zip(logits, students):
        torch.testing.assert_close(got, reference, rtol=1e-5, atol=1e-5)


def test_masked_heads_equal_pruned_heads():
    """Zeroing the linear_proj columns of the dropped heads == removing them (with their bias rows)."""
    cases = []
    for seed, family in enumerate(FAMILIES):
        teacher = tiny_arch(tie=False, family=family)
        sd = bridge.hf_to_global(teacher, hf_model(teacher).state_dict())
        for heads, groups in [(2, 2), (2, 1)]:
            target = PruneSpec(num_attention_heads=heads, num_query_groups=groups).target_arch(teacher)
            idx = random_indices(teacher, target, list(range(teacher.num_layers)), seed=10 * seed + groups)
            idx.hidden = torch.arange(teacher.hidden_size)
            idx.neurons = {i: torch.arange(teacher.ffn_hidden_size) for i in idx.layers}
            masked = dict(sd)
            for i, kept in idx.heads.items():
                name = f"decoder.layers.{i}.self_attention.linear_proj.weight"
                w = masked[name].clone().view(64, 4, 24)
                w[:, [h for h in range(4) if h not in kept.flatten().tolist()]] = 0
                masked[name] = w.view(64, 96)
            cases += [(teacher, masked, ()), (target, prune_global(sd, teacher, target, idx), ()), (teacher, sd, ())]
    [logits] = run_distributed(logits_of, world_size=1, args=(cases,))
    for virtual, physical, unpruned in zip(logits[::3], logits[1::3], logits[2::3]):
        torch.testing.assert_close(physical, virtual, rtol=1e-5, atol=1e-5)
        assert (virtual - unpruned).abs().max() > 1e-3  # the prune really changed the model


def test_pruned_model_exports_to_transformers(tmp_path):
    """A width-pruned Qwen2 / Qwen3 (hidden 42 with 4 heads of 24: not a multiple) writes a directory
    that AutoModelForCausalLM loads as the family's class, computing the same logits."""
    from nemo_minitron.models.hf_io import write_hf_directory

    for family in FAMILIES:
        teacher = tiny_arch(tie=False, family=family, num_attention_heads=6, num_query_groups=2)
        target = PruneSpec(hidden_size=42, num_attention_heads=4).target_arch(teacher)
        hf = hf_model(teacher)
        idx = random_indices(teacher, target, list(range(teacher.num_layers)), seed=7)
        pruned = bridge.global_to_hf(target, prune_global(bridge.hf_to_global(teacher, hf.state_dict()), teacher,
                                                          target, idx))
        out = write_hf_directory(target, pruned, None, tmp_path / family)
        loaded = transformers.AutoModelForCausalLM.from_pretrained(str(out)).eval()
        assert type(loaded).__name__ == f"Qwen{family[-1]}ForCausalLM"
        assert arch_from_hf(loaded.config) == target
        reference = hf_model(target)
        reference.load_state_dict(pruned, strict=False)
        torch.testing.assert_close(loaded(TOKENS).logits, reference(TOKENS).logits, rtol=0, atol=0)


# --- parameter counts --------------------------------------------------------------------------

def test_parameter_counts_equal_transformers_and_the_model_cards():
    for family in FAMILIES:
        for tie in (True, False):
            arch = tiny_arch(tie=tie, family=family)
            hf_count = sum(p.numel() for p in hf_model(arch).parameters())  # tied counted once
            assert arch.num_parameters()["total"] == count_from_shapes(arch)["total"] == hf_count
    # Model cards: Qwen2.5-7B 7.61B (6.53B non-embedding), Qwen3-8B 8.2B (6.95B non-embedding)
    qwen25, qwen3 = PUBLISHED_TEACHERS["qwen2.5-7b"].num_parameters(), PUBLISHED_TEACHERS["qwen3-8b"].num_parameters()
    assert (qwen25["total"], qwen25["non_embedding"]) == (7_615_616_512, 6_525_621_760)
    assert (qwen3["total"], qwen3["non_embedding"]) == (8_190_735_360, 6_946_075_648)
    # a head prune removes the heads' biases; q/k norms stay
    teacher = PUBLISHED_TEACHERS["qwen2.5-7b"]
    student = PruneSpec(num_attention_heads=24).target_arch(teacher)  # 7 -> 6 heads in each of 4 groups
    removed = teacher.num_parameters()["total"] - student.num_parameters()["total"]
    assert removed == 4 * 128 * (2 * teacher.hidden_size + 1) * teacher.num_layers  # q rows + q bias + o_proj


def test_magnitude_head_scores_count_the_q_bias():
    from nemo_minitron.importance.scores import magnitude_scores

    arch = tiny_arch(tie=False, family="qwen2")
    sd = bridge.hf_to_global(arch, hf_model(arch).state_dict())
    without = {k: (torch.zeros_like(v) if k.endswith("linear_qkv.bias") else v) for k, v in sd.items()}
    q_bias = sd["decoder.layers.1.self_attention.linear_qkv.bias"].view(2, 4, 24)[:, :2].reshape(4, 24)
    with_bias, plain = magnitude_scores(arch, sd), magnitude_scores(arch, without)
    torch.testing.assert_close(with_bias.heads[1].square() - plain.heads[1].square(), q_bias.square().sum(1))
    assert torch.equal(with_bias.hidden, plain.hidden) and torch.equal(with_bias.neurons, plain.neurons)


@pytest.mark.slow
def test_scores_and_pruned_weights_at_tp2_equal_tp1():
    """Activation scores, then prune_model (gather, surgery, reshard) at TP=2 give TP=1's scores and
    bit-identical pruned weights: the QKV bias shards and prunes with its groups' rows."""
    from test_prune import _check_layout, _layout_reference

    _check_layout(_layout_reference("qwen2"), 2, 1, 2)


def _save_all(cases):
    from test_checkpoint import save_from_global

    for arch, global_sd, path in cases:
        save_from_global(arch, global_sd, path)


def _load_all(paths):
    from test_checkpoint import load_and_gather

    return [load_and_gather(path) for path in paths]


@pytest.mark.slow
def test_checkpoint_saved_at_tp2_loads_at_pp2(tmp_path):
    from nemo_minitron import checkpoint

    cases = []
    for family in FAMILIES:
        arch = tiny_arch(tie=family == "qwen3", family=family)
        cases.append((arch, bridge.hf_to_global(arch, hf_model(arch).state_dict()), tmp_path / family))
    run_distributed(_save_all, world_size=2, tp=2, args=(cases,))
    for arch, _, path in cases:
        assert checkpoint.read_arch(path) == arch
    for loaded in run_distributed(_load_all, world_size=2, pp=2, args=([path for *_, path in cases],)):
        for (arch, global_sd, _), got in zip(cases, loaded):
            assert got.keys() == global_sd.keys()
            for name, tensor in global_sd.items():
                assert torch.equal(got[name], tensor), name


@pytest.mark.slow
def test_cli_imports_qwen_and_exports_it_to_megatron_lm(tmp_path):
    """`minitron import hf_path=` of a Qwen2 directory gives transformers' weights; export-megatron
    writes it with --add-qkv-bias and re-imports bit-exactly (tests/test_megatron_lm.py checks every
    family, tests/test_nemo2.py NeMo 2 in and out)."""
    from commands import last_json, minitron
    from nemo_minitron import checkpoint
    from tiny import write_hf_dir

    arch = tiny_arch(tie=False, family="qwen2")
    model = write_hf_dir(tmp_path / "hf", arch)
    result = last_json(minitron("import", f"hf_path={tmp_path / 'hf'}", f"output_dir={tmp_path / 'ckpt'}"))
    assert result["total"] == sum(p.numel() for p in model.parameters())
    assert checkpoint.read_arch(tmp_path / "ckpt") == arch_from_hf(model.config)
    minitron("export-megatron", f"checkpoint={tmp_path / 'ckpt'}", f"output_dir={tmp_path / 'megatron'}")
    assert "--add-qkv-bias" in (tmp_path / "megatron" / "megatron_args.txt").read_text().split()
    minitron("import", f"megatron_path={tmp_path / 'megatron'}", f"output_dir={tmp_path / 'again'}")
    assert checkpoint.read_arch(tmp_path / "again") == checkpoint.read_arch(tmp_path / "ckpt")
    [[first, again]] = run_distributed(_load_all, world_size=1, args=([tmp_path / "ckpt", tmp_path / "again"],))
    assert first.keys() == again.keys() and all(torch.equal(first[k], again[k]) for k in first)
