"""The family table (`models/families.py`) is the one source of what a family is: each family is
recognised from its own layers, and its Hugging Face classes are transformers' own, both ways."""

from __future__ import annotations

import pytest
import transformers

from nemo_minitron.models.families import FAMILIES, ROUTED_SHARED, computes_alike, family_of
from nemo_minitron.models.hf_config import arch_from_hf, to_hf
from tiny import tiny_arch, tiny_moe_arch


@pytest.mark.parametrize("name", list(FAMILIES))
def test_a_family_is_recognised_from_its_layers(name):
    f = FAMILIES[name]
    found = family_of(f.normalization, f.activation, f.qkv_bias, f.qk_norm, f.is_moe, f.experts == ROUTED_SHARED,
                      f.hybrid)
    # the first family of the same layers: itself, or Llama for Mistral (which computes alike)
    assert found == name or (computes_alike(found, name) and list(FAMILIES).index(found) < list(FAMILIES).index(name))


@pytest.mark.parametrize("name", list(FAMILIES))
def test_a_family_round_trips_through_its_own_transformers_classes(name):
    f = FAMILIES[name]
    arch = tiny_moe_arch(family=name) if f.is_moe else tiny_arch(family=name)
    config = to_hf(arch)
    assert type(config) is getattr(transformers, f.hf_config) and config.architectures == [f.hf_class]
    assert hasattr(transformers, f.hf_class) and getattr(config, f.hf_act_key) == f.hf_act
    assert arch_from_hf(config.to_dict()) == arch


def test_families_computing_alike_are_exactly_llama_and_mistral():
    alike = {(a, b) for a in FAMILIES for b in FAMILIES if a < b and computes_alike(a, b)}
    assert alike == {("llama", "mistral")}
