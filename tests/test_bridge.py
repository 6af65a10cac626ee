"""HF <-> Megatron bridge: logits equal transformers' at TP=1, TP=2, PP=2, TP=2xPP=2 for Llama, Mistral
and Nemotron-4 (LayerNorm1P, squared ReLU, partial rotary); round trips exact."""

from __future__ import annotations

import pytest
import torch

from distributed import run_distributed
from nemo_minitron.models import bridge
from tiny import hf_model, tiny_arch

TOKENS = torch.randint(0, 320, (2, 12), generator=torch.Generator().manual_seed(0))


def megatron_logits(arch, global_sd):
    from nemo_minitron.models.gpt import build_gpt_model
    from nemo_minitron.models.runner import forward_microbatches, gather_vocab_parallel

    model = build_gpt_model(arch)
    bridge.load_global(model, global_sd)
    out = forward_microbatches(
        model, [{"tokens": TOKENS[:1]}, {"tokens": TOKENS[1:]}], lambda logits, _: gather_vocab_parallel(logits)
    )
    regathered = bridge.gather_global(model)
    return (torch.cat(out) if out else None), regathered


@pytest.mark.parametrize(
    "tie,rope_scaling,family",
    [(True, False, "llama"), (False, True, "llama"), (False, False, "mistral"), (False, False, "nemotron")],
)
def test_logits_match_transformers_tp1(tie, rope_scaling, family):
    arch = tiny_arch(tie, rope_scaling, family)
    hf = hf_model(arch)
    global_sd = bridge.hf_to_global(arch, hf.state_dict())
    expected = hf(TOKENS).logits
    [(logits, regathered)] = run_distributed(megatron_logits, world_size=1, args=(arch, global_sd))
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    for name, tensor in global_sd.items():
        assert torch.equal(regathered[name], tensor), name


@pytest.mark.slow
@pytest.mark.parametrize("tp,pp,family", [(2, 1, "llama"), (1, 2, "llama"), (2, 2, "llama"), (2, 2, "nemotron")])
def test_logits_match_transformers_parallel(tp, pp, family):
    arch = tiny_arch(tie=family == "llama", family=family)
    hf = hf_model(arch)
    global_sd = bridge.hf_to_global(arch, hf.state_dict())
    expected = hf(TOKENS).logits
    results = run_distributed(megatron_logits, world_size=tp * pp, tp=tp, pp=pp, args=(arch, global_sd))
    last_stage = [logits for logits, _ in results if logits is not None]
    assert len(last_stage) == tp
    for logits in last_stage:
        torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    for _, regathered in results:  # sharding then gathering is the identity on every rank
        assert regathered.keys() == global_sd.keys()
        for name, tensor in global_sd.items():
            assert torch.equal(regathered[name], tensor), name


@pytest.mark.parametrize("family", ["llama", "nemotron"])
def test_hf_roundtrip_exact(family):
    arch = tiny_arch(tie=False, family=family)
    hf_sd = hf_model(arch).state_dict()
    back = bridge.global_to_hf(arch, bridge.hf_to_global(arch, hf_sd))
    assert back.keys() == {k for k in hf_sd if "rotary" not in k}
    for name, tensor in back.items():
        if family == "nemotron" and name.endswith("norm.weight"):
            # zero-centred gamma + 1 - 1 in fp32: exact up to one ulp of the + 1 (2^-23)
            torch.testing.assert_close(tensor, hf_sd[name], rtol=0, atol=2.0**-23)
        else:
            assert torch.equal(tensor, hf_sd[name]), name


def test_nemotron_norm_gamma_is_stored_as_applied():
    """HF Nemotron stores LayerNorm1P gammas zero-centred; the megatron side holds weight + 1."""
    arch = tiny_arch(tie=False, family="nemotron")
    hf_sd = hf_model(arch).state_dict()
    global_sd = bridge.hf_to_global(arch, hf_sd)
    assert torch.equal(global_sd["decoder.layers.1.input_layernorm.weight"], hf_sd["model.layers.1.input_layernorm.weight"] + 1)
    assert torch.equal(global_sd["decoder.final_layernorm.bias"], hf_sd["model.norm.bias"])
    assert global_sd["decoder.layers.0.mlp.linear_fc1.weight"].shape == (arch.ffn_hidden_size, arch.hidden_size)


def test_shape_mismatch_is_a_clear_error():
    arch = tiny_arch(tie=True)
    hf_sd = hf_model(arch).state_dict()
    with pytest.raises(ValueError, match="does not match the model config|implies"):
        bridge.hf_to_global(arch.replace(ffn_hidden_size=128), hf_sd)
    untied = hf_model(tiny_arch(tie=False)).state_dict()
    del untied["lm_head.weight"]
    with pytest.raises(ValueError, match="lm_head"):
        bridge.hf_to_global(tiny_arch(tie=False), untied)


def test_parallel_layout_errors_name_the_key():
    arch = tiny_arch(tie=True)
    with pytest.raises(ValueError, match="tp=4 does not divide num_query_groups=2"):
        arch.check_parallel(tp=4, pp=1)
    with pytest.raises(ValueError, match="pp=3"):
        arch.check_parallel(tp=1, pp=3)
