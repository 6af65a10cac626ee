"""Slurm launchers, run against stub srun / scontrol that record their command lines."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from nemo_minitron.cli.compose import recipe_names

ROOT = Path(__file__).resolve().parents[1]
STAGES = ["import", "prune", "search", "distill", "teacher_correct", "teacher_logits", "align", "export_hf", "export_megatron",
          "export_nemo", "eval", "pipeline"]
# recipe launcher, its arguments selecting a recipe -> the stage and the recipe it runs
RECIPE_LAUNCHERS = {
    ("distill_mn8b", ()): ("distill", "mn_minitron_8b"),
    ("prune_mn8b", ()): ("prune", "mn_minitron_8b"),
    ("distill_llama31_4b", ()): ("distill", "llama31_minitron_4b_width"),
    ("distill_llama31_4b", ("--depth",)): ("distill", "llama31_minitron_4b_depth"),
    ("prune_llama31_4b", ()): ("prune", "llama31_minitron_4b_width"),
    ("prune_llama31_4b", ("--depth",)): ("prune", "llama31_minitron_4b_depth"),
    ("distill_nemotron4", ()): ("distill", "nemotron4_minitron_8b"),
    ("distill_nemotron4", ("--4b",)): ("distill", "nemotron4_minitron_4b"),
    ("prune_qwen3", ()): ("prune", "qwen3_8b_to_6b"),
    ("distill_qwen3", ()): ("distill", "qwen3_8b_to_6b"),
    ("prune_nemotron_nano", ()): ("prune", "nemotron_nano_9b_v2"),
    ("distill_nemotron_nano", ()): ("distill", "nemotron_nano_9b_v2"),
}


@pytest.fixture
def stubs(tmp_path):
    """A PATH with recording `srun` and `scontrol`; `srun` waits for SIGUSR1 when asked to."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "calls.log"
    (bin_dir / "srun").write_text(
        "#!/bin/bash\n"
        f'echo "srun $*" >> {log}\n'
        'if [ -n "${STUB_WAIT_FOR_USR1:-}" ]; then\n'
        f'  trap \'echo "srun got USR1" >> {log}; exit 0\' USR1\n'
        "  while true; do sleep 0.1; done\n"
        "fi\n"
        'exit "${STUB_EXIT:-0}"\n'
    )
    (bin_dir / "scontrol").write_text(
        "#!/bin/bash\n"
        f'echo "scontrol $*" >> {log}\n'
        'if [ "$1 $2" = "show hostnames" ]; then echo gpu-017; echo gpu-018; fi\n'
    )
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    env = {
        **os.environ, "PATH": f"{bin_dir}:{Path(sys.executable).parent}:{os.environ['PATH']}",
        "SLURM_JOB_ID": "4242", "SLURM_JOB_NUM_NODES": "2", "SLURM_GPUS_ON_NODE": "8",
        "SLURM_JOB_NODELIST": "gpu-[017-018]", "SLURM_SUBMIT_DIR": str(ROOT),
    }
    env.pop("MASTER_ADDR", None)
    return env, log


def _srun_line(minitron_args: str) -> str:
    """What the launcher's srun records for `--container img:1` and `minitron_args`."""
    return (f"srun --ntasks-per-node=8 --kill-on-bad-exit=1 --container-image=img:1 "
            f"--container-workdir={Path.cwd()} minitron {minitron_args}")


def _login_node(env: dict) -> dict:
    """`env` without the Slurm allocation, on a 1-node x 8-GPU layout: where --dry-run is used."""
    return {**{k: v for k, v in env.items() if not k.startswith("SLURM_")},
            "MINITRON_NODES": "1", "MINITRON_GPUS_PER_NODE": "8"}


@pytest.mark.parametrize("stage", STAGES)
def test_every_stage_runs_srun_with_layout_and_overrides(stubs, stage):
    env, log = stubs
    proc = subprocess.run(["bash", str(ROOT / "launchers" / f"{stage}.sh"), "--tp", "4", "--pp", "2",
                           "--container", "img:1", "train.steps=10", "output_dir=/ckpt/x"],
                          env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    calls = log.read_text().splitlines()
    cli_stage = stage.replace("_", "-")
    srun = [c for c in calls if c.startswith("srun ")]
    assert srun == [_srun_line(f"{cli_stage} tp=4 pp=2 train.steps=10 output_dir=/ckpt/x")]
    assert "tp=4 pp=2 dp=2" in proc.stdout  # 2 nodes x 8 GPUs / (4 x 2)
    assert "scontrol show hostnames gpu-[017-018]" in calls  # MASTER_ADDR from the first node


def test_bad_layout_is_refused(stubs):
    env, log = stubs
    proc = subprocess.run(["bash", str(ROOT / "launchers" / "distill.sh"), "--tp", "3"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "tp=3 x pp=1 does not divide 2 node(s) x 8 GPU(s)" in proc.stderr
    assert not log.exists()


def test_preemption_forwards_signal_and_requeues(stubs):
    env, log = stubs
    proc = subprocess.Popen(["bash", str(ROOT / "launchers" / "distill.sh"), "--tp", "8"],
                            env={**env, "STUB_WAIT_FOR_USR1": "1"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 30
    while time.time() < deadline and not (log.exists() and "srun " in log.read_text()):
        time.sleep(0.1)
    time.sleep(0.3)
    proc.send_signal(signal.SIGUSR1)  # what `sbatch --signal=B:USR1@300` does before the time limit
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    calls = log.read_text().splitlines()
    assert "srun got USR1" in calls
    assert calls[-1] == "scontrol requeue 4242"


@pytest.mark.parametrize(("code", "requeued"), [(75, True), (3, False), (2, False)])
def test_task_exit_code_decides_requeue(stubs, code, requeued):
    """75 (the stage stopped at a pre-emption checkpoint) requeues the job and ends the launcher
    successfully; a divergence (3) or bad input (2) fails it without a requeue."""
    env, log = stubs
    proc = subprocess.run(["bash", str(ROOT / "launchers" / "distill.sh"), "--tp", "8"], env={**env, "STUB_EXIT": str(code)},
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == (0 if requeued else code), proc.stderr
    assert ("scontrol requeue 4242" in log.read_text()) == requeued


def test_dry_run_prints_layout_and_resolved_config(stubs):
    env, _ = stubs
    proc = subprocess.run(["bash", str(ROOT / "launchers" / "eval.sh"), "--dry-run", "--tp", "2",
                           "checkpoint=/ckpt/teacher", "data=/data/heldout.jsonl"],
                          env=_login_node(env), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "world=8 tp=2 pp=1 dp=4" in proc.stdout
    assert "tp: 2" in proc.stdout and "checkpoint: /ckpt/teacher" in proc.stdout


@pytest.mark.parametrize(("launcher", "selection"), sorted(RECIPE_LAUNCHERS))
def test_recipe_launcher_runs_its_stage_with_the_recipe(stubs, launcher, selection):
    env, log = stubs
    stage, recipe = RECIPE_LAUNCHERS[launcher, selection]
    proc = subprocess.run(["bash", str(ROOT / "launchers" / f"{launcher}.sh"), *selection, "--tp", "4", "--pp", "2",
                           "--container", "img:1", "output_dir=/ckpt/x"],
                          env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    srun = [c for c in log.read_text().splitlines() if c.startswith("srun ")]
    assert srun == [_srun_line(f"{stage} tp=4 pp=2 recipe={recipe} output_dir=/ckpt/x")]


@pytest.mark.parametrize("launcher,stage", [("prune_qwen3", "prune"), ("distill_qwen3", "distill")])
def test_moe_recipe_launchers_split_the_experts_over_expert_parallel_ranks(stubs, launcher, stage):
    env, log = stubs
    proc = subprocess.run(["bash", str(ROOT / "launchers" / f"{launcher}.sh"), "--moe", "--container", "img:1",
                           "output_dir=/ckpt/x"],
                          env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "world=16 tp=1 pp=1 ep=8 dp=16" in proc.stdout
    srun = [c for c in log.read_text().splitlines() if c.startswith("srun ")]
    assert srun == [_srun_line(f"{stage} tp=1 pp=1 ep=8 recipe=qwen3_30b_a3b_96_experts output_dir=/ckpt/x")]
    proc = subprocess.run(["bash", str(ROOT / "launchers" / f"{launcher}.sh"), "--moe", "--ep", "3"],
                          env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "tp=1 x pp=1 x ep=3 does not divide 16 GPU(s)" in proc.stderr


def test_recipe_launcher_dry_run_shows_the_recipe_under_the_command_line(stubs):
    env, _ = stubs
    proc = subprocess.run(["bash", str(ROOT / "launchers" / "distill_mn8b.sh"), "--dry-run", "train.steps=100",
                           "teacher=/ckpt/teacher"],
                          env=_login_node(env), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    layout, resolved = proc.stdout.split("\n", 1)
    assert "world=8 tp=8 pp=1 dp=1" in layout  # the launcher's default --tp 8
    cfg = OmegaConf.create(resolved)
    assert (cfg.optim.lr, cfg.optim.min_lr, cfg.optim.warmup_steps) == (1e-4, 4.5e-7, 60)
    assert (cfg.train.global_batch_size, cfg.train.seq_length, cfg.dtype, cfg.tp) == (768, 8192, "bfloat16", 8)
    assert cfg.train.steps == 100 and cfg.teacher == "/ckpt/teacher"  # the recipe says 60399 steps


def test_unknown_recipe_is_one_error_line(stubs):
    env, _ = stubs
    proc = subprocess.run(["bash", str(ROOT / "launchers" / "distill.sh"), "--dry-run", "recipe=mn_minitron_9b"],
                          env=_login_node(env), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == f"error: recipe=mn_minitron_9b is not one of {recipe_names()} (conf/recipes/)"
    assert "Traceback" not in proc.stderr


def test_pipeline_launcher_takes_a_recipe_between_overrides(stubs):
    """The launcher puts tp=/pp= first; --config-name may still come between key=value overrides."""
    env, _ = stubs
    proc = subprocess.run(["bash", str(ROOT / "launchers" / "pipeline.sh"), "--dry-run", "--tp", "8",
                           "teacher.hf_path=/models/Nemotron-4-15B", "--config-name", "recipes/nemotron4_minitron_8b",
                           "corpus.user_paths=[/data/distill]"],
                          env=_login_node(env), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    cfg = OmegaConf.create(proc.stdout.split("\n", 1)[1])
    assert (cfg.tp, cfg.teacher.hf_path, list(cfg.corpus.user_paths)) == (8, "/models/Nemotron-4-15B", ["/data/distill"])
    assert (cfg.prune.target.hidden_size, cfg.distill.train.seq_length) == (4096, 4096)  # the recipe's
