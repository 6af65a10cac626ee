"""Slurm launchers, run against stub srun / scontrol that record their command lines."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STAGES = ["import", "prune", "search", "distill", "teacher_correct", "align", "export_hf", "eval", "pipeline"]


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
    assert srun == [f"srun --ntasks-per-node=8 --kill-on-bad-exit=1 --container-image=img:1 "
                    f"--container-workdir={Path.cwd()} minitron {cli_stage} tp=4 pp=2 train.steps=10 output_dir=/ckpt/x"]
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


def test_dry_run_prints_layout_and_resolved_config(stubs):
    env, _ = stubs
    env = {k: v for k, v in env.items() if not k.startswith("SLURM_")}  # on a login node
    proc = subprocess.run(["bash", str(ROOT / "launchers" / "eval.sh"), "--dry-run", "--tp", "2",
                           "checkpoint=/ckpt/teacher", "data=/data/heldout.jsonl"],
                          env={**env, "MINITRON_NODES": "1", "MINITRON_GPUS_PER_NODE": "8"},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "world=8 tp=2 pp=1 dp=4" in proc.stdout
    assert "tp: 2" in proc.stdout and "checkpoint: /ckpt/teacher" in proc.stdout
