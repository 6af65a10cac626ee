"""The launchers under a real Slurm: a one-node cluster on this machine (tests/slurm_cluster.py) runs
`sbatch launchers/distill.sh --no-container` jobs on CPU (gloo), and their results equal the same run
under torchrun; a job signalled as Slurm signals a pre-empted one checkpoints, requeues itself,
resumes and ends with the weights of an uninterrupted run.

The `slurm` tests start daemons (and install slurm-wlm and munge with apt-get where they are missing),
so they are also `slow`: full suite only. Without Slurm (no root, no apt, a daemon that will not
start) they are skipped with the reason. The unmarked tests check the launcher's --no-container
srun line against the stand-ins of tests/test_launchers.py.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from distributed import run_distributed
from filelock import FileLock
from slurm_cluster import SlurmCluster, SlurmUnavailable
from test_launchers import stubs  # noqa: F401  (the fixture: recording srun / scontrol)

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
STEPS = 30


# --- the launcher without a container, against the stand-ins ---------------------------------------

def test_no_container_runs_the_environments_minitron(stubs):  # noqa: F811
    env, log = stubs
    for how in (["--no-container"], []):
        log.unlink(missing_ok=True)
        extra = {} if how else {"MINITRON_CONTAINER": "none"}
        proc = subprocess.run(["bash", str(ROOT / "launchers" / "distill.sh"), *how, "--tp", "8", "train.steps=10"],
                              env={**env, **extra}, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        srun = [c for c in log.read_text().splitlines() if c.startswith("srun ")]
        assert srun == ["srun --ntasks-per-node=8 --kill-on-bad-exit=1 minitron distill tp=8 pp=1 train.steps=10"]
        assert "container=none" in proc.stdout and f"no container: {VENV_BIN / 'minitron'}" in proc.stdout


def test_no_container_without_minitron_on_path_is_one_error_line(stubs, tmp_path):  # noqa: F811
    env, log = stubs
    bare = {**env, "PATH": f"{tmp_path / 'bin'}:/usr/bin:/bin"}
    proc = subprocess.run(["bash", str(ROOT / "launchers" / "distill.sh"), "--no-container", "--tp", "8"],
                          env=bare, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "activate its environment before sbatch" in proc.stderr
    assert "srun " not in (log.read_text() if log.exists() else "")


def test_tasks_per_node_follow_ntasks_per_node_without_gpus(stubs):  # noqa: F811
    """A CPU node has no SLURM_GPUS_ON_NODE: the job's --ntasks-per-node sets the tasks per node."""
    env, log = stubs
    env = {k: v for k, v in env.items() if k != "SLURM_GPUS_ON_NODE"}
    proc = subprocess.run(["bash", str(ROOT / "launchers" / "distill.sh"), "--no-container", "--tp", "2"],
                          env={**env, "SLURM_NTASKS_PER_NODE": "2"}, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "nodes=2 gpus/node=2 world=4 tp=2 pp=1 dp=2" in proc.stdout
    assert [c for c in log.read_text().splitlines() if c.startswith("srun ")] == [
        "srun --ntasks-per-node=2 --kill-on-bad-exit=1 minitron distill tp=2 pp=1"]


# --- the real cluster ------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def slurm_cluster(request, tmp_path_factory, shared_dir):
    """A one-node Slurm cluster of this machine for the session; skips the `slurm` tests, with the
    reason, where Slurm cannot be installed or started. The start-up and shutdown times are reported."""
    # `pytest` as root without apt-get or network skips; two xdist workers do not run apt-get at once.
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    report = request.config.pluginmanager.get_plugin("terminalreporter")
    try:
        with FileLock(str(shared_dir / "slurm-install.lock")):
            cluster.start()
    except (SlurmUnavailable, OSError, subprocess.SubprocessError) as err:
        pytest.skip(f"no Slurm cluster here: {err}")
    if report:
        report.write_line(f"[slurm] cluster up in {cluster.startup_s:.1f} s under {cluster.root}")
    yield cluster
    cluster.stop()
    if report:
        report.write_line(f"[slurm] cluster stopped in {cluster.shutdown_s:.1f} s"
                          + (f" (killed leftover pids {cluster.killed_leftovers})" if cluster.killed_leftovers else ""))
    assert cluster.running() == [], f"Slurm processes left running: {cluster.running()}"


def job_env(cluster: SlurmCluster) -> dict:
    """What a user's shell has when submitting from the activated venv."""
    return {**cluster.env, "PATH": f"{VENV_BIN}:{cluster.env['PATH']}", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def _job_id(sbatch: subprocess.CompletedProcess) -> str:
    match = re.search(r"Submitted batch job (\d+)", sbatch.stdout)
    assert match, sbatch.stdout + sbatch.stderr
    return match.group(1)


@pytest.mark.slurm
@pytest.mark.slow
def test_sbatch_runs_two_tasks_and_the_launcher_passes_their_exit_code(slurm_cluster, tmp_path):
    """A trivial `sbatch --wait` job runs two srun tasks; the launcher without a container starts the
    venv's minitron on --ntasks-per-node tasks, and a stage's bad input (2) fails the job, unrequeued."""
    out = tmp_path / "hello.out"
    proc = slurm_cluster.run("sbatch", "--wait", "--ntasks-per-node=2", f"--output={out}",
                             "--wrap", "srun bash -c 'echo task $SLURM_PROCID of $SLURM_NTASKS'", timeout=120)
    assert sorted(out.read_text().split("\n")[:2]) == ["task 0 of 2", "task 1 of 2"], out.read_text()
    assert slurm_cluster.job_state(_job_id(proc)) == "COMPLETED"

    out = tmp_path / "eval.out"
    job = _job_id(slurm_cluster.run("sbatch", "--ntasks-per-node=2", "--gpus-per-node=0", f"--output={out}",
                                    f"--chdir={tmp_path}", "launchers/eval.sh", "--no-container", "--tp", "2",
                                    "checkpoint=/nonexistent", f"data={tmp_path / 'x.txt'}",
                                    env=job_env(slurm_cluster), cwd=ROOT))
    state = slurm_cluster.wait_job(job, timeout=300)
    log = out.read_text()
    assert state == "FAILED", log
    assert "[launcher] stage=eval nodes=1 gpus/node=2 world=2 tp=2 pp=1 dp=1 container=none" in log
    assert f"[launcher] no container: {VENV_BIN / 'minitron'}" in log
    assert "checkpoint=/nonexistent does not exist" in log and "requeueing" not in log
    # 2 from the first task to exit; srun --kill-on-bad-exit then terminates the other, and when that one
    # had not exited yet srun reports 143 (128 + SIGTERM), the highest of its tasks' codes
    assert slurm_cluster.job_field(job, "ExitCode") in ("2:0", "143:0"), log


# --- distillation: sbatch against torchrun ---------------------------------------------------------

@pytest.fixture(scope="module")
def distill_inputs(tmp_path_factory, tiny_teacher_source) -> Path:
    """The tiny teacher, a depth-pruned student (its layers 0 and 3) and train/valid JSONL, as
    tests/test_distill.py makes them for its command-line resume test."""
    from test_distill import distill_inputs_in

    return distill_inputs_in(tmp_path_factory.mktemp("slurm_distill"), tiny_teacher_source)


def distill_overrides(root: Path, out: Path) -> list[str]:
    # fp32: the comparison is with the TP=2 tests' tolerance, not bf16's
    return [f"teacher={root / 'teacher'}", f"student={root / 'student'}", f"output_dir={out}",
            f"data.train={root / 'train.jsonl'}", f"data.valid={root / 'valid.jsonl'}", f"data.cache_dir={root / 'cache'}",
            f"train.steps={STEPS}", "train.global_batch_size=4", "train.seq_length=32", "train.log_interval=1",
            "train.progress_bar=false", "optim.warmup_steps=2", "loss.intermediate=[1:3]", "loss.kind=jsd",
            "dtype=float32"]


def _last_json(text: str) -> dict:
    return json.loads([line for line in text.splitlines() if line.startswith("{")][-1])


def _final_weights(*paths: str):
    from nemo_minitron import checkpoint
    from nemo_minitron.models import bridge

    return [bridge.gather_global(checkpoint.load_checkpoint(path)) for path in paths]


def assert_same_weights(ours: Path, ref: Path) -> None:
    """Bitwise equal: the same ranks run the same ops in the same order under srun as under torchrun
    (stricter than the TP=2-versus-TP=1 tests' atol=1e-4, which compare different layouts)."""
    [(a, b)] = run_distributed(_final_weights, world_size=1, args=(str(ours), str(ref)))
    assert a.keys() == b.keys()
    for name, tensor in b.items():
        torch.testing.assert_close(a[name], tensor, rtol=0, atol=0, msg=name)


@pytest.fixture(scope="module")
def torchrun_reference(distill_inputs, tmp_path_factory) -> tuple[Path, dict]:
    """The distillation at TP=2 under torchrun: its output directory and its final metrics line."""
    out = tmp_path_factory.mktemp("torchrun") / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           "-m", "nemo_minitron.cli.main", "distill", "tp=2", "pp=1", *distill_overrides(distill_inputs, out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out, _last_json(proc.stdout)


def submit_distill(cluster: SlurmCluster, inputs: Path, out: Path, log: Path, *sbatch: str) -> str:
    """`sbatch ... launchers/distill.sh --no-container --tp 2 ...` from the repository, as a user submits
    it; the job's id."""
    return _job_id(cluster.run("sbatch", "--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=0", f"--output={log}",
                       f"--chdir={log.parent}", *sbatch, "launchers/distill.sh", "--no-container", "--tp", "2",
                       *distill_overrides(inputs, out), env=job_env(cluster), cwd=ROOT))


@pytest.mark.slurm
@pytest.mark.slow
def test_distill_job_equals_torchrun(slurm_cluster, distill_inputs, torchrun_reference, tmp_path):
    ref_out, expected = torchrun_reference
    log = tmp_path / "distill.out"
    job = submit_distill(slurm_cluster, distill_inputs, tmp_path / "run", log)
    state = slurm_cluster.wait_job(job, timeout=600)
    text = log.read_text()
    assert state == "COMPLETED", text[-4000:]
    assert "[launcher] stage=distill nodes=1 gpus/node=2 world=2 tp=2 pp=1 dp=1 container=none" in text
    assert "world=2 tp=2 pp=1 dp=1" in text.split("[launcher] no container", 1)[1]  # the stage's own layout line
    result = _last_json(text)
    assert result["step"] == expected["step"] == STEPS and result["valid"] == expected["valid"]
    assert_same_weights(tmp_path / "run" / "final", ref_out / "final")


@pytest.mark.slurm
@pytest.mark.slow
def test_preempted_distill_job_requeues_and_resumes_to_the_same_weights(slurm_cluster, distill_inputs,
                                                                      torchrun_reference, tmp_path):
    """`scancel --signal=USR1 --batch` (what --signal=B:USR1@T does before the time limit) reaches the
    launcher, which forwards it to the tasks; they checkpoint and exit, the launcher requeues the job,
    Slurm runs it again and it resumes to the weights of the uninterrupted torchrun run."""
    ref_out, expected = torchrun_reference
    log = tmp_path / "distill.out"
    job = submit_distill(slurm_cluster, distill_inputs, tmp_path / "run", log, "--open-mode=append")
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not (log.exists() and "step 3:" in log.read_text()):
        assert slurm_cluster.job_state(job) in ("PENDING", "CONFIGURING", "RUNNING"), log.read_text()
        time.sleep(0.2)
    assert "step 3:" in log.read_text(), f"the job never reached step 3:\n{log.read_text()}"
    slurm_cluster.run("scancel", "--signal=USR1", "--batch", job)
    state = slurm_cluster.wait_job(job, timeout=600)
    text = log.read_text()
    assert state == "COMPLETED", text[-4000:]
    assert slurm_cluster.job_field(job, "Restarts") == "1", text[-4000:]
    assert "[launcher] pre-emption signal: checkpointing" in text
    assert f"[launcher] requeueing job {job}; the stage resumes from its last checkpoint" in text
    [stopped] = [r for r in map(json.loads, (line for line in text.splitlines() if line.startswith("{"))) if r.get("interrupted")]
    assert 3 <= stopped["step"] < STEPS
    assert f"(step {stopped['step']})" in text  # the second run says where it resumed
    assert "Traceback" not in text
    result = _last_json(text)
    assert result["step"] == expected["step"] == STEPS and result["valid"] == expected["valid"]
    assert_same_weights(tmp_path / "run" / "final", ref_out / "final")
