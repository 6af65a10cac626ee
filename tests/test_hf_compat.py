"""Exports every consumer reads, and the older megatron-core.

An export-hf directory (`write_hf_directory` of `global_to_hf`, as the export stage writes it)
loads under transformers 4.57 (the venv scripts/compat.sh makes and scripts/test.sh installs,
with megatron-core 0.15.3) and under this venv's transformers 5 to the megatron model's logits,
with the same rotary frequencies, token ids and chat template; pruned shapes (hidden 448 with 9
heads of 64), Qwen2 / Qwen3 and the MoE families included, and the directory reads back bit-exactly. The same venv runs the core
tests on megatron-core 0.15.3 with transformers 4.57.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import gguf
import pytest
import torch

import hf_reader
from commands import COMPAT_MCORE
from distributed import run_distributed
from nemo_minitron.models import bridge, gguf_import
from nemo_minitron.models.families import FAMILIES
from nemo_minitron.models.hf_config import export_family, export_notes
from nemo_minitron.models.hf_io import read_hf_directory, save_portable_tokenizer, write_hf_directory
from nemo_minitron.pruning import PruneSpec
from nemo_minitron.pruning.planner import PUBLISHED_RECIPES, PUBLISHED_TEACHERS, plan, published_student
from tiny import hf_model, tiny_arch, tiny_moe_arch, tiny_tokenizer

ROOT = Path(__file__).parents[1]

TOKENS = torch.randint(0, 320, (2, 12), generator=torch.Generator().manual_seed(0))
# SmolLM2-135M width-pruned to hidden 448 keeps 9 heads of 64: hidden is neither heads x head_dim
# nor a multiple of the heads.
PRUNED = dict(num_layers=2, hidden_size=448, num_attention_heads=9, num_query_groups=3, kv_channels=64)
CASES = {
    "llama-tied-rope-scaling": tiny_arch(tie=True, rope_scaling=True, max_position_embeddings=16384),
    "mistral": tiny_arch(tie=False, family="mistral"),
    "nemotron": tiny_arch(tie=False, family="nemotron"),
    "llama-pruned": tiny_arch(tie=True, **PRUNED),
    "nemotron-pruned": tiny_arch(tie=False, family="nemotron", **PRUNED),
    "qwen2": tiny_arch(tie=False, family="qwen2"),
    "qwen3-pruned": tiny_arch(tie=True, family="qwen3", **PRUNED),
    "mixtral": tiny_moe_arch("mixtral", tie=True),
    "qwen2-moe": tiny_moe_arch("qwen2_moe", kv_channels=16),  # 4.57 builds Qwen2-MoE heads of hidden / heads only
    "qwen3-moe": tiny_moe_arch("qwen3_moe"),
}
TEXTS = ["Hello, world!", "Room 101 and  42 items cost $3.50", "Café naïve — 日本語 🤖", "<|endoftext|>x", ""]
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name two primes."}]
TINY_TEMPLATE = ("{% for m in messages %}<|endoftext|>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant:{% endif %}")


def megatron_logits(cases):
    from nemo_minitron.models.gpt import build_gpt_model
    from nemo_minitron.models.runner import forward_microbatches, gather_vocab_parallel

    out = []
    for arch, global_sd in cases:
        model = build_gpt_model(arch)
        bridge.load_global(model, global_sd)
        [logits] = forward_microbatches(model, [{"tokens": TOKENS}], lambda logits, _: gather_vocab_parallel(logits))
        out.append(logits)
    return out


def tokenizers() -> dict:
    """The tiny BPE with a chat template, and the embedded teacher's tokenizer (SmolLM2: digit
    splitting, special tokens, its own chat template), rebuilt from the GGUF metadata alone."""
    tiny = tiny_tokenizer()
    tiny.chat_template = TINY_TEMPLATE
    metadata = gguf_import._read_metadata(gguf.GGUFReader(gguf_import.embedded_gguf_path()))
    return {"tiny": tiny, "smollm2": gguf_import._build_tokenizer(metadata)}


def transformers_5_only(config_file: Path) -> None:
    """The config.json transformers 5 alone writes: rotary settings in `rope_parameters` only."""
    config = json.loads(config_file.read_text())
    for key in ("rope_theta", "rope_scaling", "partial_rotary_factor"):
        config.pop(key, None)
    config_file.write_text(json.dumps(config))


@pytest.fixture(scope="module")
def reads(tmp_path_factory, compat_python):
    """{name: (what transformers 4.57 read, what transformers 5 read)} for every export and
    tokenizer, plus the models' global weights and their megatron logits."""
    root = tmp_path_factory.mktemp("exports")
    weights = {name: bridge.hf_to_global(arch, hf_model(arch).state_dict()) for name, arch in CASES.items()}
    requests = {}
    for name, arch in CASES.items():
        write_hf_directory(arch, bridge.global_to_hf(arch, weights[name]), tiny_tokenizer(), root / name)
        requests[name] = {"hf_dir": str(root / name), "tokens": TOKENS.tolist()}
    stripped = root / "llama-transformers-5-config"
    write_hf_directory(CASES["llama-tied-rope-scaling"], bridge.global_to_hf(
        CASES["llama-tied-rope-scaling"], weights["llama-tied-rope-scaling"]), None, stripped)
    transformers_5_only(stripped / "config.json")
    requests["llama-transformers-5-config"] = {"hf_dir": str(stripped), "tokens": TOKENS.tolist()}
    originals = tokenizers()
    for name, tokenizer in originals.items():
        save_portable_tokenizer(tokenizer, root / f"tokenizer-{name}")
        requests[f"tokenizer-{name}"] = {"hf_dir": str(root / f"tokenizer-{name}"), "texts": TEXTS, "chat": CHAT}

    (root / "requests.json").write_text(json.dumps(list(requests.values())))
    proc = subprocess.run([str(compat_python), str(Path(hf_reader.__file__)), str(root / "requests.json"),
                           str(root / "results.pt")], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    old = dict(zip(requests, torch.load(root / "results.pt")))
    new = {name: hf_reader.read(request) for name, request in requests.items()}
    [logits] = run_distributed(megatron_logits, world_size=1, args=([(CASES[n], weights[n]) for n in CASES],))
    return {"old": old, "new": new, "weights": weights, "megatron": dict(zip(CASES, logits)), "root": root,
            "originals": originals}


@pytest.mark.parametrize("name", CASES)
def test_transformers_4_57_and_5_load_the_megatron_model(reads, name):
    arch = CASES[name]
    old, new = reads["old"][name], reads["new"][name]
    assert old["transformers"].startswith("4.57.") and new["transformers"].startswith("5.")
    assert old["model_class"] == new["model_class"] == FAMILIES[export_family(arch)].hf_class
    assert torch.equal(old["inv_freq"], new["inv_freq"])  # the same rotary settings, at every position
    torch.testing.assert_close(new["logits"], reads["megatron"][name], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(old["logits"], reads["megatron"][name], rtol=1e-5, atol=1e-5)


def test_transformers_4_needs_the_explicit_rope_keys(reads):
    """What the export fixes: from `rope_parameters` alone 4.57 falls back to theta 10000 and no scaling."""
    old, new = reads["old"]["llama-transformers-5-config"], reads["new"]["llama-transformers-5-config"]
    torch.testing.assert_close(new["logits"], reads["megatron"]["llama-tied-rope-scaling"], rtol=1e-5, atol=1e-5)
    assert not torch.equal(old["inv_freq"], new["inv_freq"])
    assert not torch.allclose(old["logits"], reads["megatron"]["llama-tied-rope-scaling"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", CASES)
def test_export_reads_back_bit_exact(reads, name):
    arch = CASES[name]
    back, hf_state, _ = read_hf_directory(reads["root"] / name)
    # Only the family may change: a Llama export in Mistral's class reads back as Mistral, which computes the same.
    assert back == arch.replace(family=export_family(arch))
    global_sd = bridge.hf_to_global(back, hf_state)
    assert global_sd.keys() == reads["weights"][name].keys()
    for key, tensor in reads["weights"][name].items():
        assert torch.equal(global_sd[key], tensor), key


@pytest.mark.parametrize("name", ["tiny", "smollm2"])
def test_tokenizer_reads_the_same_in_transformers_4_57_and_5(reads, name):
    original = reads["originals"][name]
    old, new = reads["old"][f"tokenizer-{name}"], reads["new"][f"tokenizer-{name}"]
    assert old["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert old["ids"] == new["ids"] == [original(text)["input_ids"] for text in TEXTS]
    assert old["special"] == new["special"] == {"bos": original.bos_token_id, "eos": original.eos_token_id,
                                                 "vocab": len(original)}
    assert old["chat"] == new["chat"] == original.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)


def test_export_notes_name_what_a_family_class_cannot_hold():
    for teacher in PUBLISHED_TEACHERS.values():
        assert export_notes(teacher) == []
    for name in PUBLISHED_RECIPES:
        assert export_notes(published_student(name)[1]) == []
    [note] = export_notes(CASES["llama-pruned"])
    assert "hidden_size=448 is not a multiple of num_attention_heads=9" in note and "MistralForCausalLM" in note
    assert export_notes(CASES["nemotron-pruned"]) == []  # NemotronConfig takes any head_dim
    [note] = export_notes(CASES["nemotron"].replace(rope_scaling_factor=8.0))
    assert "transformers 4.x" in note
    assert export_notes(CASES["qwen2-moe"]) == []  # 4 heads of 16 fill hidden 64
    [note] = export_notes(CASES["qwen2-moe"].replace(num_attention_heads=2, num_query_groups=1))
    assert "Qwen2MoeForCausalLM" in note and "transformers 4.x" in note
    smollm2 = tiny_arch(tie=True, num_layers=30, hidden_size=576, ffn_hidden_size=1536, num_attention_heads=9,
                        num_query_groups=3, kv_channels=64)
    [note] = plan(smollm2, PruneSpec(hidden_size=512))["hf_export"]  # the planner warns before any pruning
    assert "hidden_size=512 is not a multiple of num_attention_heads=9" in note
    assert plan(smollm2, PruneSpec(ffn_hidden_size=768, num_layers=24))["hf_export"] == []


@pytest.mark.nemo
@pytest.mark.timeout(1800)
def test_core_tests_pass_on_megatron_core_0_15_with_transformers_4_57():
    """scripts/compat.sh in the venv test.sh made: the bridge (against transformers 4.57's
    models), the parallel schedules and the checkpoints on megatron-core 0.15.3."""
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "compat.sh"), COMPAT_MCORE], cwd=ROOT,
                          capture_output=True, text=True, timeout=1700)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert f"megatron-core {COMPAT_MCORE}: core tests passed" in proc.stdout
    print(proc.stdout.strip().splitlines()[-1])  # the time it took, shown with pytest -s
