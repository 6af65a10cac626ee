"""backend=nemo_aligner: run an alignment stage through NeMo-Aligner in the NGC NeMo container.

Our config is translated into NeMo-Aligner's: the checkpoint is exported to a Hugging Face
directory, converted to a .nemo file with NeMo's Llama converter, and NeMo-Aligner's own training
script (`examples/nlp/gpt/train_gpt_sft.py` for SFT/SteerLM, `train_gpt_dpo.py` for DPO/RPO) runs
with Hydra overrides for the data, parallel layout, batch, schedule and loss. Those scripts ship in
the NeMo-Aligner source tree of the container (`nemo_aligner.root`), not in the Python package.
`nemo_aligner.dry_run=true` prints the commands instead of running them.
"""

from __future__ import annotations

import importlib.util
import logging
import shlex
import subprocess
import sys
from pathlib import Path

from nemo_minitron.errors import UserError
log = logging.getLogger("nemo_minitron")

# Our loss kinds -> NeMo-Aligner's `model.dpo.preference_loss`.
PREFERENCE_LOSS = {"dpo": "dpo", "ipo": "ipo", "rpo": "rpo_bwd_kl", "rpo_sq": "rpo_sq"}


def commands(cfg, nemo_root: str = "/opt/NeMo") -> list[list[str]]:
    """The command lines that run the stage through NeMo-Aligner."""
    out = Path(cfg.output_dir).absolute()
    hf_dir, nemo_file = out / "nemo_aligner" / "hf", out / "nemo_aligner" / "model.nemo"
    root = Path(cfg.nemo_aligner.root)
    t, o = cfg.train, cfg.optim
    train = cfg.data.train
    if train is None:
        raise UserError("backend=nemo_aligner needs data.train= (and data.valid=) jsonl files in NeMo-Aligner's "
                        "format")
    valid = cfg.data.valid or train
    common = [
        "trainer.num_nodes=1", f"trainer.devices={cfg.tp * cfg.pp}",
        f"model.tensor_model_parallel_size={cfg.tp}", f"model.pipeline_model_parallel_size={cfg.pp}",
        f"model.global_batch_size={t.global_batch_size}", f"model.micro_batch_size={t.micro_batch_size}",
        f"model.encoder_seq_length={t.seq_length}", f"model.optim.lr={o.lr}",
        f"model.optim.sched.min_lr={o.min_lr}", f"model.optim.sched.warmup_steps={o.warmup_for(t.steps)}",
        f"model.optim.weight_decay={o.weight_decay}", f"exp_manager.explicit_log_dir={out / 'nemo_aligner' / 'logs'}",
    ]
    if cfg.preference:
        kind = cfg.loss.kind or cfg.method
        script = root / "examples/nlp/gpt/train_gpt_dpo.py"
        stage_args = [
            f"pretrained_checkpoint.restore_from_path={nemo_file}",
            f"model.data.data_prefix={{train: [{train}], validation: [{valid}], test: [{valid}]}}",
            f"trainer.dpo.max_steps={t.steps}", f"trainer.dpo.val_check_interval={t.eval_interval or t.steps}",
            f"model.dpo.ref_policy_kl_penalty={cfg.loss.beta}", f"model.dpo.preference_loss={PREFERENCE_LOSS[kind]}",
            f"model.dpo.sft_loss_weight={cfg.loss.sft_weight}",
        ]
    else:
        script = root / "examples/nlp/gpt/train_gpt_sft.py"
        stage_args = [
            f"model.restore_from_path={nemo_file}", "model.data.chat=True",
            f"model.data.train_ds.file_path={train}", f"model.data.validation_ds.file_path={valid}",
            f"model.data.train_ds.max_seq_length={t.seq_length}", f"trainer.sft.max_steps={t.steps}",
            f"trainer.sft.val_check_interval={t.eval_interval or t.steps}",
        ]
    python = sys.executable
    return [
        [python, "-m", "nemo_minitron.cli.main", "export-hf", f"checkpoint={cfg.student}", f"output_dir={hf_dir}"],
        [python, f"{nemo_root}/scripts/checkpoint_converters/convert_llama_hf_to_nemo.py",
         f"--input_name_or_path={hf_dir}", f"--output_path={nemo_file}"],
        ["torchrun", f"--nproc-per-node={cfg.tp * cfg.pp}", str(script), *common, *stage_args],
    ]


def run_nemo_aligner(cfg) -> dict:
    cmds = commands(cfg)
    if cfg.nemo_aligner.dry_run:
        return {"backend": "nemo_aligner", "commands": [shlex.join(c) for c in cmds]}
    if importlib.util.find_spec("nemo_aligner") is None:
        raise UserError(
            "backend=nemo_aligner needs NeMo-Aligner (the NGC NeMo container); use backend=native here, "
            "or nemo_aligner.dry_run=true to see the commands"
        )
    for cmd in cmds:
        log.info("running %s", shlex.join(cmd))
        subprocess.run(cmd, check=True)
    return {"backend": "nemo_aligner", "output_dir": str(Path(cfg.output_dir).absolute() / "nemo_aligner")}
