"""Megatron-LM checkpoints: a model trained with Megatron-LM's `pretrain_gpt.py` (or, for a hybrid,
`pretrain_mamba.py`) as the teacher, and a student written so that Megatron-LM trains it on with
`--load`.

Megatron-LM's `--ckpt-format torch_dist` layout (megatron/training/checkpointing.py):

    DIR/                                  the run's --save directory
      latest_checkpointed_iteration.txt   the latest save: an iteration number ("2000") or "release"
      iter_0002000/                       one save (`get_checkpoint_name`: iter_{iteration:07d}), a
                                          megatron-core distributed checkpoint of the state dict
                                          that `generate_state_dict` builds:
        common.pt                           what is not a tensor: `args` (the run's argparse
                                            Namespace), `checkpoint_version` (3.0), `iteration`,
                                            `num_floating_point_operations_so_far`, ...
        metadata.json, .metadata, *.distcp  the tensors: `model` = GPTModel.sharded_state_dict()
                                            (a hybrid's MambaModel's), under the keys of our own
                                            weights/ (no prefix); the optimizer and `rng_state`
                                            unless --no-save-optim / --no-save-rng
      release/                            a save without training state (tracker "release"):
                                          Megatron-LM starts it at iteration 0 and loads neither
                                          optimizer nor RNG state from it

The architecture is recorded only in `args`: `arch_from_args` maps it to a `ModelArch`, refusing
what nemo-minitron cannot prune (biases, positions other than rotary, routing beyond the Hugging Face
families', ...); the family follows from the layers (`_family`): RMSNorm + SwiGLU is Llama, Qwen2
with --add-qkv-bias, Qwen3 with --qk-layernorm; with --num-experts Mixtral, Qwen3-MoE (query/key
norms) or Qwen2-MoE (QKV biases and a gated shared expert). A run that built megatron's Mamba stack
(`_is_hybrid`: --is-hybrid-model, a --hybrid-override-pattern or layer ratios, or the --spec of
megatron's Mamba stack) is Nemotron-H: its layer pattern and --mamba-* sizes are read as
pretrain_mamba.py hands them to `MambaModel`. `megatron_args` is its inverse, the `args` an export
records, and `command_line_flags` the same settings as the flags of the script that builds the model
(`training_script`; FLAGS_FILE). Megatron-LM pads the vocabulary to a multiple of
`--make-vocab-size-divisible-by` x TP; the padded rows are kept (the model computes
exactly as in Megatron-LM), so `vocab_size` is the embedding's row count and the tokenizer may be
shorter by less than one padding multiple.
"""

from __future__ import annotations

import argparse
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from nemo_minitron import parallel
from nemo_minitron.errors import UserError
from nemo_minitron.models.config import LAYER_SYMBOLS, MAMBA_KEYS, ModelArch
from nemo_minitron.models.families import FAMILIES, family_attention, family_of, has_layers, no_family_problem
from nemo_minitron.models.gpt import layer_pattern, mamba_fields
from nemo_minitron.models.saved_weights import (check_padded_vocab, check_saved_shapes, common_state_readable,
                                                load_model_weights, saved_shapes, shift_norm_weights,
                                                te_spec_sharded_state)
from nemo_minitron.writer_processes import writers_die_with_parent

log = logging.getLogger("nemo_minitron")

TRACKER_FILE = "latest_checkpointed_iteration.txt"
RELEASE = "release"
FLAGS_FILE = "megatron_args.txt"
TOKENIZER_DIR = "tokenizer"
ENTRIES = (TRACKER_FILE, RELEASE, FLAGS_FILE, TOKENIZER_DIR)  # what an export writes
CHECKPOINT_VERSION = 3.0   # what generate_state_dict records; older versions change how Megatron-LM loads
# Megatron-LM saves with `singleton_local_shards` off: per-layer tensors stacked over the layers.
CONTENT_METADATA = {"singleton_local_shards": False}
_SAVE = re.compile(r"^(iter_\d{7,}|release)$")

# The --spec pretrain_mamba.py builds a hybrid's layers with: megatron-core's Mamba stack (module, name).
MAMBA_STACK_SPEC = ("megatron.core.models.mamba.mamba_layer_specs", "mamba_stack_spec")

# pretrain_gpt.py / pretrain_mamba.py flags (megatron/training/arguments.py, _add_network_size_args,
# _add_experimental_args for the hybrid's, and friends) that build a model: (args attribute, flag,
# kind). A "value" flag is written with its value (unless None: a dense model's MoE flags, a GPT
# model's Mamba flags), a "values" flag with its list of values, a "store_true" flag when the
# attribute is true, a "store_false" flag when it is false.
FLAGS = (
    ("num_layers", "--num-layers", "value"),
    ("hidden_size", "--hidden-size", "value"),
    ("ffn_hidden_size", "--ffn-hidden-size", "value"),
    ("num_attention_heads", "--num-attention-heads", "value"),
    ("group_query_attention", "--group-query-attention", "store_true"),
    ("num_query_groups", "--num-query-groups", "value"),
    ("kv_channels", "--kv-channels", "value"),
    ("max_position_embeddings", "--max-position-embeddings", "value"),
    ("seq_length", "--seq-length", "value"),
    ("position_embedding_type", "--position-embedding-type", "value"),
    ("rotary_base", "--rotary-base", "value"),
    ("rotary_percent", "--rotary-percent", "value"),
    ("use_rope_scaling", "--use-rope-scaling", "store_true"),
    ("rope_scaling_factor", "--rope-scaling-factor", "value"),
    ("normalization", "--normalization", "value"),
    ("norm_epsilon", "--norm-epsilon", "value"),
    ("swiglu", "--swiglu", "store_true"),
    ("squared_relu", "--squared-relu", "store_true"),
    ("untie_embeddings_and_output_weights", "--untie-embeddings-and-output-weights", "store_true"),
    ("add_bias_linear", "--disable-bias-linear", "store_false"),
    ("add_qkv_bias", "--add-qkv-bias", "store_true"),
    ("qk_layernorm", "--qk-layernorm", "store_true"),
    ("num_experts", "--num-experts", "value"),
    ("moe_ffn_hidden_size", "--moe-ffn-hidden-size", "value"),
    ("moe_router_topk", "--moe-router-topk", "value"),
    ("moe_router_pre_softmax", "--moe-router-pre-softmax", "store_true"),
    ("moe_router_dtype", "--moe-router-dtype", "value"),
    ("moe_shared_expert_intermediate_size", "--moe-shared-expert-intermediate-size", "value"),
    ("moe_shared_expert_gate", "--moe-shared-expert-gate", "store_true"),
    ("spec", "--spec", "values"),
    ("is_hybrid_model", "--is-hybrid-model", "store_true"),
    ("hybrid_override_pattern", "--hybrid-override-pattern", "value"),
    *((key, "--" + key.replace("_", "-"), "value") for key in MAMBA_KEYS),  # --mamba-num-heads, ...
    ("make_vocab_size_divisible_by", "--make-vocab-size-divisible-by", "value"),
    ("tokenizer_type", "--tokenizer-type", "value"),
    ("tokenizer_model", "--tokenizer-model", "value"),
)
# args that make a model nemo-minitron cannot prune: attribute -> what it is. Megatron-LM's defaults
# leave each of them false / None.
_UNSUPPORTED = {
    "multi_latent_attention": "multi-latent attention (--multi-latent-attention)",
    "mtp_num_layers": "multi-token prediction layers (--mtp-num-layers)",
    "rotary_interleaved": "interleaved rotary embeddings (--rotary-interleaved)",
    "rotary_seq_len_interpolation_factor": "rotary sequence interpolation (--rotary-seq-len-interpolation-factor)",
    "no_rope_freq": "layers without rotary embeddings (--no-rope-freq)",
    "window_size": "sliding-window attention (--window-size)",
    "apply_residual_connection_post_layernorm": "post-norm residuals (--apply-residual-connection-post-layernorm)",
    "heterogeneous_layers_config_path": "heterogeneous layers (--heterogeneous-layers-config-path)",
    "glu_linear_offset": "an offset in the GLU (--glu-linear-offset)",
    # routing beyond the Hugging Face MoE families' (softmax over the router logits, top-k)
    "moe_router_topk_scaling_factor": "scaled routing weights (--moe-router-topk-scaling-factor)",
    "moe_router_num_groups": "group-limited routing (--moe-router-num-groups)",
    "moe_router_enable_expert_bias": "expert biases in routing (--moe-router-enable-expert-bias)",
    "moe_expert_capacity_factor": "token dropping (--moe-expert-capacity-factor)",
}


@dataclass(frozen=True)
class MegatronLMCheckpoint:
    """One save of a Megatron-LM run, read as far as building its model needs."""

    path: Path                # its iter_NNNNNNN/ or release/ directory
    arch: ModelArch
    zero_centred_gamma: bool  # --apply-layernorm-1p: the norms hold gamma - 1


# --- the directory -----------------------------------------------------------------------------

def _save_name(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def _saves(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.is_dir() and _SAVE.match(p.name))


def checkpoint_dir(root: Path, iteration: int | None) -> Path:
    """The directory of save `iteration` in the Megatron-LM --save directory `root`; with None the
    save latest_checkpointed_iteration.txt names (Megatron-LM's read_metadata + get_checkpoint_name)."""
    if not root.is_dir():
        raise UserError(f"megatron_path={root} is not a directory")
    tracker = root / TRACKER_FILE
    if iteration is not None:
        name = _save_name(iteration)
    elif not tracker.is_file():
        raise UserError(f"megatron_path={root} has no {TRACKER_FILE}: point it at the --save directory of a "
                        f"Megatron-LM run, or choose a save with iteration=N (saves there: {_saves(root) or 'none'})")
    else:
        text = tracker.read_text().strip()
        if not (text == RELEASE or text.isdigit()):
            raise UserError(f"{tracker} holds {text!r}, neither an iteration number nor {RELEASE!r}")
        name = RELEASE if text == RELEASE else _save_name(int(text))
    path = root / name
    if not path.is_dir():
        raise UserError(f"megatron_path={root} has no save {name}/: choose iteration= among {_saves(root) or 'none'}")
    if not (path / "metadata.json").is_file():
        if any(p.name.startswith("mp_rank_") for p in path.iterdir()):
            raise UserError(f"{path} holds a --ckpt-format torch checkpoint (one file per rank): re-save it as "
                            f"torch_dist with Megatron-LM (--ckpt-convert-format torch_dist --ckpt-convert-save DIR)")
        raise UserError(f"{path} is not a megatron distributed checkpoint (no metadata.json): save with "
                        f"--ckpt-format torch_dist")
    return path


def read_args(path: Path) -> argparse.Namespace:
    """The training arguments Megatron-LM stored in the common state of save directory `path`."""
    with common_state_readable(path, [argparse.Namespace]) as file:
        common = torch.load(file, map_location="cpu", weights_only=True)
    args = common.get("args") if isinstance(common, dict) else None
    if not isinstance(args, argparse.Namespace):
        raise UserError(f"{file} holds no training arguments (`args`): not a checkpoint of Megatron-LM's "
                        f"pretrain_gpt.py or pretrain_mamba.py")
    return args


# --- args <-> ModelArch --------------------------------------------------------------------------

def _arg(args: argparse.Namespace, name: str) -> Any:
    if not hasattr(args, name):
        raise UserError(f"the checkpoint's args lack {name}: not a checkpoint of Megatron-LM's pretrain_gpt.py or "
                        f"pretrain_mamba.py")
    return getattr(args, name)


def _activation(args: argparse.Namespace) -> str | None:
    if getattr(args, "swiglu", False):
        return "swiglu"
    return "squared_relu" if getattr(args, "squared_relu", False) else None


def _is_hybrid(args: argparse.Namespace) -> bool:
    """Whether the run built megatron's Mamba stack (pretrain_mamba.py): it says --is-hybrid-model,
    lays out its layers (--hybrid-override-pattern, --hybrid-attention-ratio, --hybrid-mlp-ratio) or
    names megatron's Mamba stack spec."""
    spec = getattr(args, "spec", None) or ()
    return bool(getattr(args, "is_hybrid_model", False) or getattr(args, "hybrid_override_pattern", None)
                or getattr(args, "hybrid_attention_ratio", 0.0) or getattr(args, "hybrid_mlp_ratio", 0.0)
                or tuple(spec) == MAMBA_STACK_SPEC)


def training_script(arch: ModelArch) -> str:
    """The Megatron-LM script that trains `arch`: pretrain_mamba.py builds the hybrids."""
    return "pretrain_mamba.py" if arch.is_hybrid else "pretrain_gpt.py"


def _problems(args: argparse.Namespace) -> list[str]:
    """What in `args` nemo-minitron cannot import, one phrase each."""
    problems = [what for name, what in _UNSUPPORTED.items() if getattr(args, name, None)]
    # Biases are on by default. Some older runs record `disable_bias_linear`, which Megatron-LM's
    # load_args_from_checkpoint lets win over add_bias_linear.
    if hasattr(args, "disable_bias_linear"):
        biases = not args.disable_bias_linear
    else:
        biases = getattr(args, "add_bias_linear", True)
    if biases:
        problems.append("linear biases (train with --disable-bias-linear)")
    if _is_hybrid(args):
        return problems + _hybrid_problems(args)
    rotary = getattr(args, "use_rotary_position_embeddings", False)  # the deprecated spelling of rope
    position = "rope" if rotary else _arg(args, "position_embedding_type")
    if position != "rope":
        problems.append(f"--position-embedding-type {position} (rotary only)")
    activation = _activation(args)
    layers = (_arg(args, "normalization"), activation)
    if activation is None:
        problems.append("a GeLU-family MLP (nemo-minitron prunes --swiglu and --squared-relu MLPs)")
    elif not has_layers(*layers):
        problems.append(f"--normalization {layers[0]} with a {activation} MLP (supported: RMSNorm with --swiglu, "
                        f"LayerNorm with --squared-relu)")
    elif _family(args) is None:
        flags = ("--add-qkv-bias", "--qk-layernorm", "--num-experts", "--moe-shared-expert-intermediate-size")
        named = ", ".join(flag for flag, on in zip(flags, _extras(args)) if on)
        problems.append(no_family_problem(*layers, named, flags[:3]))
    if getattr(args, "num_experts", None):
        problems += _moe_problems(args)
    return problems


def _hybrid_problems(args: argparse.Namespace) -> list[str]:
    """What in the args of a pretrain_mamba.py run no Nemotron-H computes: positional embeddings,
    zero-centred norms, layer kinds beyond M, * and - (MoE layers, E), other layers than RMSNorm,
    squared-ReLU MLPs and plain attention."""
    problems = []
    position = _arg(args, "position_embedding_type")
    if position != "none":
        problems.append(f"--position-embedding-type {position} in a hybrid model (Nemotron-H's attention has no "
                        f"positional embedding: none only)")
    if getattr(args, "apply_layernorm_1p", False):
        problems.append("zero-centred norms (--apply-layernorm-1p) in a hybrid model")
    pattern = layer_pattern(args, _arg(args, "num_layers"))
    others = sorted(set(pattern) - set(LAYER_SYMBOLS))
    if others:
        problems.append(f"hybrid layers {others} in the pattern {pattern} (--hybrid-override-pattern; supported: "
                        f"{LAYER_SYMBOLS})")
    if _family(args) is None:
        flags = ("--add-qkv-bias", "--qk-layernorm", "--num-experts")
        extras = "".join(f", {flag}" for flag, on in zip(flags, _extras(args)) if on)
        problems.append(f"--normalization {_arg(args, 'normalization')} with a {_activation(args) or 'GeLU-family'} "
                        f"MLP{extras} in a hybrid model (Nemotron-H's layers are RMSNorm, --squared-relu MLPs and "
                        f"attention without {', '.join(flags)})")
    return problems


def _moe_problems(args: argparse.Namespace) -> list[str]:
    """What in the MoE args of `args` no Hugging Face MoE family computes."""
    problems = []
    score = getattr(args, "moe_router_score_function", "softmax")
    if score != "softmax":
        problems.append(f"--moe-router-score-function {score} (softmax only)")
    frequency = getattr(args, "moe_layer_freq", 1)
    if frequency != 1 and not (isinstance(frequency, list) and set(frequency) == {1}):
        problems.append(f"dense layers between the MoE layers (--moe-layer-freq {frequency}; every layer's MLP "
                        f"must be an MoE layer)")
    if getattr(args, "moe_shared_expert_intermediate_size", None) and not getattr(args, "moe_shared_expert_gate",
                                                                               False):
        problems.append("a shared expert without its gate (add --moe-shared-expert-gate, as Qwen2-MoE has)")
    return problems


def _extras(args: argparse.Namespace) -> tuple[bool, bool, bool, bool]:
    """(QKV biases, query/key norms, MoE layers, a shared expert) of the run."""
    return (bool(getattr(args, "add_qkv_bias", False)), bool(getattr(args, "qk_layernorm", False)),
            bool(getattr(args, "num_experts", None)), getattr(args, "moe_shared_expert_intermediate_size", None)
            is not None)


def _family(args: argparse.Namespace) -> str | None:
    """The first family (so Llama before Mistral) whose layers, attention extras, MoE layers and
    stack (a hybrid's or not) are the run's; None when no family has them."""
    return family_of(_arg(args, "normalization"), _activation(args), *_extras(args), hybrid=_is_hybrid(args))


def arch_from_args(args: argparse.Namespace, vocab_size: int) -> ModelArch:
    """The ModelArch of the GPTModel pretrain_gpt.py builds from `args` (gpt_builders.gpt_builder and
    arguments.core_transformer_config_from_args), or of the MambaModel pretrain_mamba.py builds
    (mamba_builders.mamba_builder), with `vocab_size` embedding rows."""
    problems = _problems(args)
    if problems:
        raise UserError("unsupported Megatron-LM model: " + "; ".join(problems))
    family = _family(args)
    heads, hidden = _arg(args, "num_attention_heads"), _arg(args, "hidden_size")
    rotary = not FAMILIES[family].hybrid  # a hybrid's attention has none: --rotary-percent / --use-rope-scaling unused
    hybrid = {} if rotary else {"hybrid_pattern": layer_pattern(args, args.num_layers), **mamba_fields(args)}
    scaling = None
    if rotary and getattr(args, "use_rope_scaling", False):
        scaling = float(getattr(args, "rope_scaling_factor", 8.0))
    moe = {}
    if FAMILIES[family].is_moe:  # validate_args: the experts' width defaults to --ffn-hidden-size
        moe = {"num_moe_experts": args.num_experts, "moe_router_topk": getattr(args, "moe_router_topk", 2),
               "moe_ffn_hidden_size": getattr(args, "moe_ffn_hidden_size", None) or _arg(args, "ffn_hidden_size"),
               "moe_shared_expert_intermediate_size": getattr(args, "moe_shared_expert_intermediate_size", None),
               "moe_router_pre_softmax": bool(getattr(args, "moe_router_pre_softmax", False))}
    ffn = moe["moe_ffn_hidden_size"] if family == "mixtral" else _arg(args, "ffn_hidden_size")  # one width there
    return ModelArch(
        num_layers=_arg(args, "num_layers"),
        hidden_size=hidden,
        ffn_hidden_size=ffn,
        num_attention_heads=heads,
        num_query_groups=args.num_query_groups if getattr(args, "group_query_attention", False) else heads,
        kv_channels=getattr(args, "kv_channels", None) or hidden // heads,
        vocab_size=vocab_size,
        max_position_embeddings=_arg(args, "max_position_embeddings"),
        rope_theta=float(getattr(args, "rotary_base", 10000)),
        rope_scaling_factor=scaling,
        norm_eps=float(getattr(args, "norm_epsilon", 1e-5)),
        tie_embeddings=not getattr(args, "untie_embeddings_and_output_weights", False),
        family=family,
        rotary_percent=float(getattr(args, "rotary_percent", 1.0)) if rotary else 1.0,
        **family_attention(family),
        **moe,
        **hybrid,
    )


def padded_vocab_size(tokens: int, divisor: int, tp: int) -> int:
    """Megatron-LM's embedding rows for a tokenizer of `tokens` (tokenizer._vocab_size_with_padding)."""
    multiple = divisor * tp
    return math.ceil(tokens / multiple) * multiple


def vocab_divisor(vocab_size: int, tokens: int) -> int:
    """The smallest --make-vocab-size-divisible-by under which Megatron-LM pads a tokenizer of
    `tokens` to exactly `vocab_size` rows at TP=1; any TP dividing vocab_size / divisor works too."""
    return next(d for d in range(1, vocab_size + 1) if vocab_size % d == 0 and vocab_size - tokens < d)


def megatron_args(arch: ModelArch, tokens: int, seq_length: int, tokenizer_model: Path, tp: int, pp: int) -> dict:
    """The args an export records for `arch` (attribute -> value; `arch_from_args` inverts them): the
    model flags of FLAGS, the tokenizer (a Hugging Face one of `tokens` tokens at `tokenizer_model`),
    and how the save was made: no optimizer or RNG state, nothing consumed yet. A hybrid's are those
    of pretrain_mamba.py: no positional embedding, the Mamba stack spec, its layer pattern (the
    layer ratios left at 0, so megatron allocates nothing beside it) and Mamba sizes."""
    return {
        "num_layers": arch.num_layers,
        "hidden_size": arch.hidden_size,
        "ffn_hidden_size": arch.ffn_hidden_size,
        "num_attention_heads": arch.num_attention_heads,
        "group_query_attention": True,
        "num_query_groups": arch.num_query_groups,
        "kv_channels": arch.kv_channels,
        "max_position_embeddings": arch.max_position_embeddings,
        "seq_length": seq_length,
        "position_embedding_type": "none" if arch.is_hybrid else "rope",
        "add_position_embedding": True,  # Megatron-LM's default, which check_checkpoint_args compares
        "rotary_base": int(arch.rope_theta),  # an int in Megatron-LM and in GPTModel
        "rotary_percent": arch.rotary_percent,
        "use_rope_scaling": arch.rope_scaling_factor is not None,
        "rope_scaling_factor": arch.rope_scaling_factor or 8.0,
        "normalization": arch.normalization,
        "norm_epsilon": arch.norm_eps,
        "apply_layernorm_1p": False,
        "swiglu": arch.gated,
        "squared_relu": not arch.gated,
        "untie_embeddings_and_output_weights": not arch.tie_embeddings,
        "add_bias_linear": False,
        "add_qkv_bias": arch.qkv_bias,
        "qk_layernorm": arch.qk_norm,
        # MoE layers (None / False in a dense model: no flag); routing in fp32, as nemo-minitron runs it
        "num_experts": arch.num_moe_experts,
        "moe_ffn_hidden_size": arch.moe_ffn_hidden_size,
        "moe_router_topk": arch.moe_router_topk,
        "moe_router_pre_softmax": arch.moe_router_pre_softmax,
        "moe_router_dtype": "fp32" if arch.is_moe else None,
        "moe_shared_expert_intermediate_size": arch.moe_shared_expert_intermediate_size,
        "moe_shared_expert_gate": arch.moe_shared_expert_intermediate_size is not None,
        # a hybrid's layers (None / False in a GPT model: no flag)
        "spec": list(MAMBA_STACK_SPEC) if arch.is_hybrid else None,
        "is_hybrid_model": arch.is_hybrid,
        "hybrid_override_pattern": arch.hybrid_pattern,
        "hybrid_attention_ratio": 0.0,
        "hybrid_mlp_ratio": 0.0,
        **{key: getattr(arch, key) for key in MAMBA_KEYS},
        "padded_vocab_size": arch.vocab_size,
        "make_vocab_size_divisible_by": vocab_divisor(arch.vocab_size, tokens),
        "tokenizer_type": "HuggingFaceTokenizer",
        "tokenizer_model": str(tokenizer_model),
        "tensor_model_parallel_size": tp,
        "pipeline_model_parallel_size": pp,
        "ckpt_format": "torch_dist",
        "no_save_optim": True,
        "no_save_rng": True,
        "consumed_train_samples": 0,
        "skipped_train_samples": 0,
        "consumed_valid_samples": 0,
        "data_parallel_random_init": False,
    }


def command_line_flags(args: dict) -> list[str]:
    """The flags of FLAGS that set `args` (pretrain_gpt.py's, or a hybrid's pretrain_mamba.py's), one
    flag (and its values) per item."""
    flags = []
    for name, flag, kind in FLAGS:
        value = args[name]
        if kind == "value" and value is not None and not (name == "rope_scaling_factor" and not args["use_rope_scaling"]):
            flags.append(f"{flag} {value}")
        elif kind == "values" and value is not None:
            flags.append(" ".join([flag, *value]))
        elif (kind == "store_true" and value) or (kind == "store_false" and not value):
            flags.append(flag)
    return flags


# --- reading ---------------------------------------------------------------------------------------

def _tokenizer_dir(args: argparse.Namespace, tokenizer: str | None, path: Path) -> str:
    """`tokenizer`, else the Hugging Face tokenizer directory the run recorded if it exists here."""
    if tokenizer:
        return tokenizer
    kind, recorded = getattr(args, "tokenizer_type", None), getattr(args, "tokenizer_model", None)
    if kind == "HuggingFaceTokenizer" and recorded and Path(recorded).is_dir():
        log.info("tokenizer: %s (the run's --tokenizer-model)", recorded)
        return recorded
    raise UserError(f"set tokenizer=DIR (a Hugging Face tokenizer directory): a Megatron-LM checkpoint carries no "
                    f"tokenizer, and {path} was trained with --tokenizer-type {kind} --tokenizer-model {recorded}")


def _check_vocab(args: argparse.Namespace, rows: int, tokens: int, tokenizer: str) -> None:
    """UserError unless a tokenizer of `tokens` tokens is one Megatron-LM pads to `rows` rows."""
    recorded = getattr(args, "padded_vocab_size", None)
    if recorded is not None and recorded != rows:
        raise UserError(f"the checkpoint's args say padded_vocab_size={recorded} but its embedding has {rows} rows")
    multiple = getattr(args, "make_vocab_size_divisible_by", 1) * getattr(args, "tensor_model_parallel_size", 1)
    check_padded_vocab(rows, tokens, multiple, tokenizer,
                       f" (--tokenizer-model {getattr(args, 'tokenizer_model', None)})")


def read_checkpoint(root: str | Path, iteration: int | None, tokenizer: str | None):
    """(MegatronLMCheckpoint, tokenizer) of a save in Megatron-LM run directory `root`; the
    architecture comes from the saved args and is checked against the saved tensor shapes."""
    from transformers import AutoTokenizer

    path = checkpoint_dir(Path(root), iteration)
    args = read_args(path)
    saved = saved_shapes(path)
    if "embedding.word_embeddings.weight" not in saved:
        raise UserError(f"{path} holds no embedding.word_embeddings.weight: not a megatron-core GPTModel or "
                        f"MambaModel (legacy --use-legacy-models checkpoints are not supported)")
    rows = saved["embedding.word_embeddings.weight"][0]
    try:
        arch = arch_from_args(args, rows)
    except UserError as err:
        raise UserError(f"{path}: {err}") from None
    check_saved_shapes(arch, saved, f"{path}: its args")
    source = _tokenizer_dir(args, tokenizer, path)
    loaded = AutoTokenizer.from_pretrained(source)
    _check_vocab(args, rows, len(loaded), source)
    arch = arch.replace(bos_token_id=loaded.bos_token_id, eos_token_id=loaded.eos_token_id)
    return MegatronLMCheckpoint(path, arch, bool(getattr(args, "apply_layernorm_1p", False))), loaded


def load_weights(model, ckpt: MegatronLMCheckpoint) -> None:
    """Fill `model` (this rank's shards of `ckpt.arch`) from the save (collective); megatron reshards
    from the TP/PP it was saved at."""
    with common_state_readable(ckpt.path, [argparse.Namespace]):
        load_model_weights(model, ckpt.path)
    if ckpt.zero_centred_gamma:
        shift_norm_weights(model, 1.0)


# --- writing ---------------------------------------------------------------------------------------

def save_release(model, root: Path, args: dict, tokenizer) -> None:
    """Write `model` (collective) into `root` as a Megatron-LM release save recording `args`: into the
    existing empty root/release/ the state dict generate_state_dict builds under --no-save-optim
    --no-save-rng, beside it the tracker saying "release", the tokenizer and FLAGS_FILE."""
    from megatron.core import dist_checkpointing

    from nemo_minitron.models.hf_io import save_portable_tokenizer

    state = {"args": argparse.Namespace(**args), "checkpoint_version": CHECKPOINT_VERSION, "iteration": 0,
             "model": te_spec_sharded_state(model), "num_floating_point_operations_so_far": 0}
    with writers_die_with_parent():
        dist_checkpointing.save(state, str(root / RELEASE), content_metadata=dict(CONTENT_METADATA))
    parallel.barrier()
    if parallel.is_main_process():
        (root / TRACKER_FILE).write_text(RELEASE)
        save_portable_tokenizer(tokenizer, root / TOKENIZER_DIR)
        (root / FLAGS_FILE).write_text("\n".join(command_line_flags(args)) + "\n")
