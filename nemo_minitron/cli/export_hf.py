"""minitron export-hf: a nemo-minitron checkpoint -> a Hugging Face model directory."""

from __future__ import annotations

import logging
from pathlib import Path

from nemo_minitron import checkpoint, parallel
from nemo_minitron.cli.common import timed, torch_dtype
from nemo_minitron.models import bridge
from nemo_minitron.models.hf_io import write_hf_directory

log = logging.getLogger("nemo_minitron")


def run(cfg) -> dict:
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
            write_hf_directory(arch, hf_state, tokenizer, out)
        log.info("wrote %s", out)
    return {"hf_dir": str(out.absolute()), **times}
