"""NeMo 2 checkpoints: a model NeMo 2 trained or imported as the teacher, and a student written so
that NeMo 2 restores it (`llm.export_ckpt`, fine-tuning recipes with `resume.restore_config`).

The layout NeMo 2 (nemo_toolkit 2.x, `nemo.lightning`) writes for one checkpoint:

    DIR/
      context/                 what rebuilds the model: NeMo's `TrainerContext` (model, trainer)
        io.json                  serialised with fiddle: classes and their constructor arguments
        model.yaml               the same model as readable YAML (`_target_` = class, then fields)
        nemo_tokenizer/          the Hugging Face tokenizer files (`tokenizer.pretrained_model_name`)
        artifacts/               e.g. generation_config.json
      weights/                 a megatron-core distributed checkpoint of NeMo's MegatronParallel:
                               the GPTModel's sharded state dict under the key prefix `module.`,
                               per-layer tensors stacked over the layers (a hybrid's MambaModel:
                               per layer, as megatron's Mamba stack saves them); common.pt holds
                               Lightning's trainer state (epoch, global_step, loops) and the sharding
                               metadata

Reading needs no NeMo: the architecture is `model.yaml`'s `config` (megatron-core TransformerConfig
field names), checked against the tensor shapes in `weights/`; the tokenizer is `nemo_tokenizer/`.
NeMo's Nemotron stores LayerNorm gammas zero-centred (`layernorm_zero_centered_gamma`): +1 on read,
-1 on write, as for Megatron-LM's --apply-layernorm-1p. A hybrid is NeMo's `MambaModel`, whose
`SSMConfig` (NemotronH configs derive from it) adds the layer pattern (`hybrid_override_pattern`, or
the layer ratios) to the TransformerConfig's Mamba sizes; NeMo builds it without positional
embeddings and, whatever the config says, with an output layer of its own (untied).

Writing uses NeMo itself for `context/`: fiddle's io.json is NeMo's own serialisation of its
classes, so `write_context` builds NeMo's config, model, tokenizer and trainer objects and lets
NeMo dump them. `weights/` is our model's sharded state dict under `module.`, saved by megatron
at whatever TP/PP the export runs (a distributed checkpoint loads at any layout).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import shutil
import tempfile
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from nemo_minitron import parallel
from nemo_minitron.errors import UserError
from nemo_minitron.models.bridge import local_parameters
from nemo_minitron.models.config import LAYER_SYMBOLS, MAMBA_KEYS, ModelArch
from nemo_minitron.models.families import FAMILIES, computes_alike, family_of, has_layers, no_family_problem
from nemo_minitron.models.gpt import arch_fields, config_problems, layer_pattern
from nemo_minitron.models.hf_config import MEGATRON_LLAMA3_ROPE
from nemo_minitron.models.hf_io import make_portable
from nemo_minitron.models.saved_weights import (check_padded_vocab, check_saved_shapes, common_state_readable,
                                                load_model_weights, saved_shapes, shift_norm_weights,
                                                te_spec_sharded_state)
from nemo_minitron.writer_processes import writers_die_with_parent

log = logging.getLogger("nemo_minitron")

CONTEXT_DIR = "context"
WEIGHTS_DIR = "weights"
MODEL_YAML = "model.yaml"
TOKENIZER_DIR = "nemo_tokenizer"
ENTRIES = (CONTEXT_DIR, WEIGHTS_DIR)  # what an export writes
PREFIX = "module."  # NeMo's MegatronParallel wraps the GPTModel as `module`
# What NeMo's MegatronStrategy records beside a save (megatron's sharded_state_dict metadata).
CONTENT_METADATA = {"singleton_local_shards": False, "chained_optim_avoid_prefix": True,
                    "distrib_optim_sharding_type": "dp_reshardable"}
@dataclass(frozen=True)
class NeMo2Checkpoint:
    """One NeMo 2 checkpoint, read as far as building its model needs."""

    path: Path                # the checkpoint directory (context/ and weights/)
    arch: ModelArch
    zero_centred_gamma: bool  # layernorm_zero_centered_gamma: the norms hold gamma - 1


# --- reading ---------------------------------------------------------------------------------------

def _target_name(node: Any) -> str:
    """The class or function a model.yaml node names (`_target_`), '' when it names none."""
    return str(node.get("_target_", "")) if isinstance(node, dict) else ""


def read_model_yaml(path: Path) -> dict[str, Any]:
    """`context/model.yaml` of checkpoint `path` as a dict (YAML, no NeMo needed)."""
    import yaml

    file = path / CONTEXT_DIR / MODEL_YAML
    if not file.is_file():
        raise UserError(f"nemo_path={path} has no {CONTEXT_DIR}/{MODEL_YAML}: point it at a NeMo 2 checkpoint "
                        f"directory (the one holding context/ and weights/)" + _candidates(path))
    try:
        model = yaml.safe_load(file.read_text())
    except yaml.YAMLError as err:
        raise UserError(f"{file} is not valid YAML ({err})") from None
    if not isinstance(model, dict) or not isinstance(model.get("config"), dict):
        raise UserError(f"{file} holds no model `config`: not a NeMo 2 GPT model checkpoint")
    return model


def _candidates(path: Path) -> str:
    """', e.g. X' naming checkpoint directories below `path` (a NeMo run's checkpoints/ holds several)."""
    if not path.is_dir():
        return ""
    found = sorted(str(p.parent.parent) for p in path.glob(f"*/{CONTEXT_DIR}/{MODEL_YAML}"))
    return f"; checkpoints below it: {', '.join(found[:5])}" if found else ""


# NeMo's NemotronH configs define their MLP activation as `lambda x: torch.pow(F.relu(x), 2)`, which
# model.yaml names by its qualified name: squared ReLU.
NEMOTRON_H_SQUARED_RELU = "nemo.collections.llm.gpt.model.ssm.NemotronHConfigBase.<lambda>"
# Why export-nemo refuses a hybrid with tied embeddings.
TIED_HYBRID = ("NeMo 2's MambaModel always builds an output layer of its own (SSMConfig.configure_model shares no "
               "embedding), so a hybrid with tie_embeddings=true cannot be written as NeMo builds it: export it with "
               "export-hf or export-megatron")


def _activation(config: dict[str, Any]) -> str | None:
    target = _target_name(config.get("activation_func"))
    name = target.rsplit(".", 1)[-1]
    gated = bool(config.get("gated_linear_unit", False))
    if name == "silu" and gated:
        return "swiglu"
    if (name == "squared_relu" or target == NEMOTRON_H_SQUARED_RELU) and not gated:
        return "squared_relu"
    return None


def _is_hybrid(config: dict[str, Any]) -> bool:
    """Whether the config is an SSMConfig (NeMo's MambaModel builds megatron's Mamba stack from it):
    model.yaml then holds its `hybrid_override_pattern` field, set or null."""
    return "hybrid_override_pattern" in config


def _problems(config: dict[str, Any]) -> list[str]:
    """What in a NeMo 2 model config nemo-minitron cannot import, one phrase each."""
    problems = config_problems(types.SimpleNamespace(**config), hybrid=_is_hybrid(config))
    if _is_hybrid(config):
        return problems + _hybrid_problems(config)
    if config.get("position_embedding_type", "rope") != "rope":
        problems.append(f"position_embedding_type={config['position_embedding_type']} (rotary only)")
    window = config.get("window_size")
    if window and window[0] >= 0 and window[0] + 1 < int(config.get("seq_length", 0)):
        problems.append(f"sliding-window attention (window_size={window} is shorter than seq_length="
                        f"{config.get('seq_length')})")
    activation = _activation(config)
    layers = (config.get("normalization"), activation)
    if activation is None:
        act = _target_name(config.get("activation_func")) or config.get("activation_func")
        problems.append(f"activation_func={act} with gated_linear_unit={config.get('gated_linear_unit')} "
                        f"(nemo-minitron prunes SwiGLU and squared-ReLU MLPs)")
    elif not has_layers(*layers):
        problems.append(f"normalization={layers[0]} with a {activation} MLP (supported: RMSNorm with SwiGLU, "
                        f"LayerNorm with squared ReLU)")
    elif _family(config) is None:
        named = ", ".join(f"{key}={config.get(key)}" for key in _EXTRAS if config.get(key))
        problems.append(no_family_problem(*layers, named, _EXTRAS[:3]))
    return problems


def _hybrid_problems(config: dict[str, Any]) -> list[str]:
    """What in an SSMConfig no Nemotron-H computes: positional embeddings, zero-centred norms, layer
    kinds beyond M, * and - (MoE layers, E), other layers than RMSNorm, squared-ReLU MLPs and plain
    attention."""
    problems = []
    position = config.get("position_embedding_type", "none")
    if position != "none":
        problems.append(f"position_embedding_type={position} in a hybrid model (Nemotron-H's attention has no "
                        f"positional embedding: none only)")
    if config.get("layernorm_zero_centered_gamma"):
        problems.append("zero-centred norms (layernorm_zero_centered_gamma=True) in a hybrid model")
    pattern = layer_pattern(types.SimpleNamespace(**config), int(config.get("num_layers") or 0))
    others = sorted(set(pattern) - set(LAYER_SYMBOLS))
    if others:
        problems.append(f"hybrid layers {others} in hybrid_override_pattern={pattern} (supported: {LAYER_SYMBOLS})")
    if _family(config) is None:
        act = _target_name(config.get("activation_func")) or config.get("activation_func")
        extras = "".join(f", {key}={config.get(key)}" for key in _EXTRAS[:3] if config.get(key))
        problems.append(f"normalization={config.get('normalization')} with activation_func={act}, gated_linear_unit="
                        f"{config.get('gated_linear_unit')}{extras} in a hybrid model (Nemotron-H's layers are "
                        f"RMSNorm, squared-ReLU MLPs and attention without {', '.join(_EXTRAS[:3])})")
    return problems


# model.yaml config fields that pick among the families of the same layers (`_family`)
_EXTRAS = ("add_qkv_bias", "qk_layernorm", "num_moe_experts", "moe_shared_expert_intermediate_size")


def _family(config: dict[str, Any]) -> str | None:
    qkv_bias, qk_norm, experts, shared = (config.get(key) for key in _EXTRAS)
    return family_of(config.get("normalization"), _activation(config), bool(qkv_bias), bool(qk_norm), bool(experts),
                     shared is not None, _is_hybrid(config))


def _family_of_class(model_class: str) -> str | None:
    """The first family whose NeMo 2 model class is `model_class` (Qwen3Model: qwen3). The family is
    the one the layers compute (`_family`); the class only tells apart families that compute alike
    (Mistral's from Llama's)."""
    return next((name for name, family in FAMILIES.items()
                 if family.nemo_classes and family.nemo_classes[0] == model_class), None)


def _rope_scaling_factor(config: dict[str, Any]) -> float | None:
    """Llama 3.1-style rotary scaling: NeMo's Llama31Config fields, or megatron-core's own."""
    if "scale_factor" in config:  # Llama31Config and its subclasses
        nemo = {"low_freq_factor": config.get("low_freq_factor"), "high_freq_factor": config.get("high_freq_factor"),
                "original_max_position_embeddings": config.get("old_context_len")}
        for key, expected in MEGATRON_LLAMA3_ROPE.items():
            if nemo[key] is not None and float(nemo[key]) != expected:
                raise UserError(f"rotary scaling with {key}={nemo[key]} is not supported: megatron-core fixes it "
                                f"to {expected}")
        return float(config["scale_factor"])
    if config.get("rope_scaling"):
        return float(config.get("rope_scaling_factor", 8.0))
    return None


def arch_from_config(model: dict[str, Any], vocab_size: int) -> ModelArch:
    """The ModelArch of the GPTModel (or, from an SSMConfig, the MambaModel) NeMo builds from
    model.yaml's `model` (its class and `config`), with `vocab_size` embedding rows."""
    config = model["config"]
    problems = _problems(config)
    if problems:
        raise UserError("unsupported NeMo 2 model: " + "; ".join(problems))
    missing = [k for k in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads") if not config.get(k)]
    if missing:
        raise UserError(f"the model config lacks {missing}")
    by_layers = _family(config)
    by_class = _family_of_class(_target_name(model).rsplit(".", 1)[-1])
    family = by_class if by_class and computes_alike(by_class, by_layers) else by_layers
    namespace = types.SimpleNamespace(**config)
    if _is_hybrid(config):  # no rotary, and never tied (module docstring)
        layers = {"hybrid_pattern": layer_pattern(namespace, config["num_layers"]), "tie_embeddings": False}
    else:
        layers = {"rope_scaling_factor": _rope_scaling_factor(config),
                  "rotary_percent": float(config.get("rotary_percent", 1.0)),
                  "tie_embeddings": bool(config.get("share_embeddings_and_output_weights", False))}
    return ModelArch(
        **arch_fields(namespace, family),
        vocab_size=vocab_size,
        max_position_embeddings=int(config.get("seq_length") or 4096),
        rope_theta=float(config.get("rotary_base", 10000)),
        **layers,
    )


def _tokenizer_dir(model: dict[str, Any], path: Path, tokenizer: str | None) -> str:
    """`tokenizer`, else the Hugging Face tokenizer the checkpoint's context names, if it is here."""
    if tokenizer:
        return tokenizer
    spec = model.get("tokenizer") or {}
    name = spec.get("pretrained_model_name") if _target_name(spec).endswith("AutoTokenizer") else None
    if name:
        for candidate in (path / CONTEXT_DIR / name, Path(name)):
            if candidate.is_dir():
                return str(candidate)
    kind = _target_name(spec) or "none"
    raise UserError(f"set tokenizer=DIR (a Hugging Face tokenizer directory): {path}/{CONTEXT_DIR} names the tokenizer "
                    f"{kind} ({name or spec.get('model_path')}), which is not a Hugging Face tokenizer directory here")


def vocab_multiple(config: dict[str, Any]) -> int:
    """What NeMo pads the vocabulary to a multiple of (GPTConfig: make_vocab_size_divisible_by x TP)."""
    return int(config.get("make_vocab_size_divisible_by", 128)) * int(config.get("tensor_model_parallel_size", 1))


def _check_norms(path: Path, model) -> None:
    """Warn when every per-layer norm weight is exactly 1.0: what NeMo's HF importer leaves when it
    ran without Transformer Engine (its mapping names the fused norms; the local spec's were never
    filled), so the checkpoint lost the teacher's norms."""
    norms = [p for name, _, p in local_parameters(model) if ".layers." in name and name.endswith("layernorm.weight")]
    if norms and all(bool((p == 1.0).all()) for p in norms):
        log.warning("every per-layer norm weight in %s is exactly 1.0: if it was made by NeMo's llm.import_ckpt on a "
                    "machine without Transformer Engine, NeMo left the norms unset; re-import it where TE is "
                    "installed (or with nemo-minitron: minitron import hf_path=...)", path)


def read_checkpoint(path: str | Path, tokenizer: str | None = None):
    """(NeMo2Checkpoint, tokenizer) of the NeMo 2 checkpoint directory `path`; the architecture comes
    from context/model.yaml and is checked against the tensor shapes in weights/."""
    from transformers import AutoTokenizer

    path = Path(path)
    if path.is_file() and path.suffix == ".nemo":
        raise UserError(f"nemo_path={path} is a .nemo archive (NeMo 1); nemo-minitron reads NeMo 2 checkpoint "
                        f"directories (context/ + weights/)")
    if not path.is_dir():
        raise UserError(f"nemo_path={path} is not a directory")
    model = read_model_yaml(path)
    weights = path / WEIGHTS_DIR
    if not (weights / "metadata.json").is_file():
        raise UserError(f"{weights} is not a megatron distributed checkpoint (no metadata.json)")
    saved = {key.removeprefix(PREFIX): shape for key, shape in saved_shapes(weights).items()}
    if "embedding.word_embeddings.weight" not in saved:
        raise UserError(f"{weights} holds no {PREFIX}embedding.word_embeddings.weight: not a NeMo 2 GPT or Mamba model")
    rows = saved["embedding.word_embeddings.weight"][0]
    try:
        arch = arch_from_config(model, rows)
    except UserError as err:
        raise UserError(f"{path}/{CONTEXT_DIR}/{MODEL_YAML}: {err}") from None
    check_saved_shapes(arch, saved, f"{path}/{CONTEXT_DIR}/{MODEL_YAML}: its model config fields")
    source = _tokenizer_dir(model, path, tokenizer)
    loaded = AutoTokenizer.from_pretrained(source)
    check_padded_vocab(rows, len(loaded), vocab_multiple(model["config"]), source)
    arch = arch.replace(bos_token_id=loaded.bos_token_id, eos_token_id=loaded.eos_token_id)
    zero_centred = bool(model["config"].get("layernorm_zero_centered_gamma", False))
    return NeMo2Checkpoint(path, arch, zero_centred), loaded


def load_weights(model, ckpt: NeMo2Checkpoint) -> None:
    """Fill `model` (this rank's shards of `ckpt.arch`) from the checkpoint's weights/ (collective)."""
    weights = ckpt.path / WEIGHTS_DIR
    with common_state_readable(weights):
        load_model_weights(model, weights, prefix=PREFIX)
    if ckpt.zero_centred_gamma:
        shift_norm_weights(model, 1.0)
    if parallel.is_main_process():
        _check_norms(ckpt.path, model)


# --- writing ---------------------------------------------------------------------------------------

def nemo_version() -> str | None:
    """The installed nemo_toolkit's version, None where NeMo 2 is not importable."""
    try:
        from nemo.collections import llm  # noqa: F401  (the LLM collection: NeMo 2.x, not 1.x)
        import nemo
    except Exception:
        return None
    return str(nemo.__version__)


def require_nemo() -> str:
    version = nemo_version()
    if version is None:
        raise UserError("export-nemo writes NeMo's context/ with NeMo itself, and NeMo 2 is not importable here: "
                        "run it inside the NGC NeMo container or an environment with nemo_toolkit[nlp] 2.x beside "
                        "nemo-minitron (bash scripts/compat.sh 0.15.3 makes one; docs/multinode.md)")
    return version


def vocab_divisor(vocab_size: int) -> int:
    """The make_vocab_size_divisible_by NeMo's HF importers choose: the largest power of two up to
    128 dividing `vocab_size`, so NeMo rebuilds exactly `vocab_size` embedding rows at TP=1."""
    return math.gcd(vocab_size, 128)


def _nemo_config(arch: ModelArch, dtype: torch.dtype):
    """NeMo's model class and config object (the classes of `arch`'s family) for `arch`. An MoE's
    routing follows `arch`; its training settings (dispatcher, load balancing) stay NeMo's defaults."""
    from nemo.collections import llm

    from nemo_minitron.models.gpt import transformer_engine_available

    fields: dict[str, Any] = dict(
        num_layers=arch.num_layers, hidden_size=arch.hidden_size, ffn_hidden_size=arch.ffn_hidden_size,
        num_attention_heads=arch.num_attention_heads, num_query_groups=arch.num_query_groups,
        kv_channels=arch.kv_channels, seq_length=arch.max_position_embeddings, rotary_base=arch.rope_theta,
        rotary_percent=arch.rotary_percent, layernorm_epsilon=arch.norm_eps,
        share_embeddings_and_output_weights=arch.tie_embeddings, vocab_size=arch.vocab_size,
        make_vocab_size_divisible_by=vocab_divisor(arch.vocab_size), params_dtype=dtype,
        bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16,
    )
    if arch.is_moe:
        fields.update(num_moe_experts=arch.num_moe_experts, moe_router_topk=arch.moe_router_topk,
                      moe_ffn_hidden_size=arch.moe_ffn_hidden_size, moe_router_pre_softmax=arch.moe_router_pre_softmax)
    if arch.is_hybrid:  # the activation and is_hybrid_model are the NemotronH config's own
        fields.update(hybrid_override_pattern=arch.hybrid_pattern, **{key: getattr(arch, key) for key in MAMBA_KEYS})
    if not transformer_engine_available():  # NeMo's config refuses its fused kernels without TE
        fields.update(apply_rope_fusion=False, persist_layer_norm=False)
        if arch.is_moe:  # grouped GEMM and fused token permutation need TE too
            fields.update(moe_grouped_gemm=False, moe_permute_fusion=False)
    model_class, config_class = FAMILIES[arch.family].nemo_classes
    if arch.family == "mistral":
        fields["window_size"] = None
    if arch.family == "llama" and arch.rope_scaling_factor is not None:
        config_class, fields["scale_factor"] = "Llama31Config", arch.rope_scaling_factor
    def in_llm(path: str):
        return functools.reduce(getattr, path.split("."), llm)

    return in_llm(model_class), in_llm(config_class)(**fields)


def write_context(arch: ModelArch, tokenizer_dir: Path, context_dir: Path, dtype: torch.dtype) -> None:
    """NeMo's context/ for `arch` (rank 0 only): its model class with the config of `arch` and the
    Hugging Face tokenizer at `tokenizer_dir`, and a one-device trainer, dumped by NeMo."""
    from nemo import lightning as nl
    from nemo.collections.common.tokenizers.huggingface.auto_tokenizer import AutoTokenizer
    from nemo.lightning.io.pl import TrainerContext

    model_class, config = _nemo_config(arch, dtype)
    with tempfile.TemporaryDirectory() as staging:  # NeMo copies it into context/nemo_tokenizer
        portable = Path(staging) / TOKENIZER_DIR
        shutil.copytree(tokenizer_dir, portable)
        make_portable(portable)  # a checkpoint saved before tokenizers were written portable
        model = model_class(config, tokenizer=AutoTokenizer(str(portable)))
        trainer = nl.Trainer(devices=1, accelerator="cpu", strategy=nl.MegatronStrategy(ckpt_save_optimizer=False),
                             logger=False, enable_checkpointing=False)
        TrainerContext(model=model, trainer=trainer, extra={}).io_dump(context_dir, yaml_attrs=["model"])


def _stored_norms(sharded: dict[str, Any], offset: float) -> dict[str, Any]:
    """`sharded` with `offset` added to every norm weight's data (a zero-centred gamma on disk)."""
    return {name: dataclasses.replace(item, data=item.data.float().add(offset).to(item.data.dtype))
            if name.endswith(("layer_norm_weight", "layernorm.weight")) else item
            for name, item in sharded.items()}


def save_weights(model, weights_dir: Path, zero_centred_gamma: bool) -> None:
    """Write `model` (collective) into the existing empty `weights_dir` as NeMo's MegatronStrategy
    saves a model without optimizer state: the sharded state dict under `module.`, and the trainer
    state of a checkpoint nothing has trained yet."""
    import lightning
    from megatron.core import dist_checkpointing

    sharded = te_spec_sharded_state(model, prefix=PREFIX)
    if zero_centred_gamma:
        sharded = _stored_norms(sharded, -1.0)
    state = {"state_dict": sharded, "epoch": 0, "global_step": 0, "optimizer_states": {}, "lr_schedulers": [],
             "pytorch-lightning_version": lightning.__version__}
    with writers_die_with_parent():
        dist_checkpointing.save(state, str(weights_dir), content_metadata=dict(CONTENT_METADATA))

