"""Read and write Hugging Face model directories (config.json, safetensors, tokenizer files)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from nemo_minitron.errors import UserError, read_json
from nemo_minitron.models.config import ModelArch
from nemo_minitron.outputs import publishing, write_marker
from nemo_minitron.models.hf_config import arch_from_hf, rope_fields, to_hf


def read_hf_directory(path: str | Path, dtype: torch.dtype = torch.float32):
    """(arch, HF state dict, tokenizer) from a local HF checkpoint directory."""
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"hf_path={path} has no config.json: point hf_path= at a Hugging Face model directory")
    try:
        config = read_json(path / "config.json")
    except UserError as err:
        raise UserError(f"hf_path={path}: {err}") from None
    try:
        arch = arch_from_hf(config)
    except UserError as err:
        raise UserError(f"hf_path={path}: {err}") from None
    files = sorted(path.glob("*.safetensors"))
    if files:
        state = {}
        for f in files:
            state.update(load_file(str(f)))
    else:
        bins = sorted(path.glob("pytorch_model*.bin"))
        if not bins:
            raise FileNotFoundError(f"hf_path={path} has no *.safetensors or pytorch_model*.bin weights")
        state = {}
        for f in bins:
            state.update(torch.load(f, map_location="cpu", weights_only=True))
    state = {k: v.to(dtype) for k, v in state.items() if "rotary_emb" not in k}
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    if len(tokenizer) > arch.vocab_size:
        raise UserError(
            f"tokenizer at hf_path={path} has {len(tokenizer)} tokens but the model's vocab_size is "
            f"{arch.vocab_size}: the tokenizer does not belong to this model"
        )
    return arch, state, tokenizer


def _write_portable_config(config_file: Path, arch: ModelArch) -> None:
    """Rewrite a saved config.json so transformers 4.57 and 5.x build the same model from it: the
    rotary settings in both their forms (`hf_config.rope_fields`), a Qwen MoE's expert count
    under both its names (5.x saves `num_local_experts`, which 4.57 ignores, building its default
    128 experts from `num_experts`) and the dtype under both its names (4.57 and 5 read `dtype`,
    older 4.x `torch_dtype`)."""
    config = json.loads(config_file.read_text())
    config.update(rope_fields(arch))
    if arch.is_moe and arch.family != "mixtral":
        config["num_experts"] = config["num_local_experts"] = arch.num_moe_experts
    dtype = config.get("dtype") or config.get("torch_dtype")
    if dtype is not None:
        config["dtype"] = config["torch_dtype"] = dtype
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def save_portable_tokenizer(tokenizer, out_dir: Path) -> None:
    """`tokenizer.save_pretrained(out_dir)`, naming in tokenizer_config.json a class that every
    transformers from 4.x on loads from tokenizer.json exactly as written (`make_portable`)."""
    tokenizer.save_pretrained(str(out_dir))
    make_portable(out_dir)


def make_portable(tokenizer_dir: Path) -> None:
    """Rewrite the tokenizer class in `tokenizer_dir`/tokenizer_config.json as one every transformers
    from 4.x on loads from tokenizer.json exactly as written. transformers 5 writes
    `TokenizersBackend` (unknown to 4.x) or a family class whose 4.x fast version may rebuild
    the post-processor from its own settings (LlamaTokenizerFast does); `PreTrainedTokenizerFast`
    is the plain tokenizer.json class in both (an alias of TokenizersBackend in 5). Tokenizers
    without a tokenizer.json keep their class."""
    config_file = tokenizer_dir / "tokenizer_config.json"
    if not (tokenizer_dir / "tokenizer.json").is_file() or not config_file.is_file():
        return
    config = json.loads(config_file.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def _save_expert_files(arch: ModelArch, hf_state: dict[str, torch.Tensor], out_dir: Path) -> None:
    """config.json and safetensors shards (at most 5 GB each, with an index when there are several)
    of an MoE model, one module per expert, written directly: the layout of the published files,
    which transformers 4.x loads as is and 5.x converts to its fused experts on load (a 5.x model
    object holds other names, so it cannot take these weights by `load_state_dict`). Beside them
    generation_config.json, as `save_pretrained` writes it for a dense model (NeMo's importers read it)."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file
    from transformers import GenerationConfig

    out_dir.mkdir(parents=True, exist_ok=True)
    config = to_hf(arch)
    config.save_pretrained(str(out_dir))
    GenerationConfig.from_model_config(config).save_pretrained(str(out_dir))
    state = {name: tensor.contiguous() for name, tensor in hf_state.items()
             if not (arch.tie_embeddings and name == "lm_head.weight")}
    split = split_torch_state_dict_into_shards(state, max_shard_size="5GB")
    for file_name, names in split.filename_to_tensors.items():
        save_file({name: state[name] for name in names}, str(out_dir / file_name), metadata={"format": "pt"})
    if split.is_sharded:
        index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def write_hf_directory(arch: ModelArch, hf_state: dict[str, torch.Tensor], tokenizer, out_dir: str | Path,
                       marker: dict | None = None) -> Path:
    """Write a directory `AutoModelForCausalLM.from_pretrained` loads, published whole like checkpoints
    (by the calling process alone). `marker`: `outputs.write_marker`'s arguments (which stage wrote it,
    with what settings, from what); the entries are the files written."""
    with publishing(out_dir, collective=False) as partial:
        _write_hf_files(arch, hf_state, tokenizer, partial)
        if marker is not None:
            write_marker(partial, entries=[p.name for p in partial.iterdir()], **marker)
    return Path(out_dir).absolute()


def _write_hf_files(arch: ModelArch, hf_state: dict[str, torch.Tensor], tokenizer, partial: Path) -> None:
    from transformers import AutoModelForCausalLM

    if arch.is_moe:
        _save_expert_files(arch, hf_state, partial)
    else:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(to_hf(arch))
        model.load_state_dict(hf_state, strict=False, assign=True)
        if arch.tie_embeddings:
            model.tie_weights()
        missing = [n for n, p in model.named_parameters() if p.is_meta]
        if missing:
            raise ValueError(f"export is missing weights for {missing[:5]}")
        model.save_pretrained(str(partial), safe_serialization=True)
    for weights in partial.glob("*.safetensors"):  # safetensors writes 0600 (a temp file it renames)
        weights.chmod(0o644)
    _write_portable_config(partial / "config.json", arch)
    if tokenizer is not None:
        save_portable_tokenizer(tokenizer, partial)
