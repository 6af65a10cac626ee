"""The launchers under a real Slurm: a one-node cluster on this machine (tests/slurm_cluster.py) runs
`sbatch launchers/distill.sh --no-container` jobs on CPU (gloo), and their results equal the same run
under torchrun; a job signalled as Slurm signals a pre-empted one checkpoints, requeues itself,
resumes and ends with the weights of an uninterrupted run; so does one whose tasks alone were signalled
(the launcher reads srun's per-task exit report, not srun's status); a job killed or cancelled mid-run
is not requeued, leaves only complete step checkpoints and resumes when submitted again; and
pipeline.sh, a recipe launcher and the search's per-candidate retraining jobs run on the cluster.

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
from tiny import global_weights

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


# srun's report of its tasks (to its stderr), as the real srun words it, and srun's exit status
KILLED_ONE = "srun: error: vm: task 1: Exited with exit code 75\nsrun: error: vm: task 0: Terminated\n"


@pytest.mark.parametrize(("report", "status", "requeued"), [
    (KILLED_ONE, 143, True),  # the first task to exit stopped at a checkpoint; srun terminated the other
    ("srun: error: vm: tasks 0-1: Exited with exit code 75\n", 75, True),
    ("srun: error: vm: task 0: Exited with exit code 75\n", 75, True),
    ("", 75, True),  # no report: srun's status decides
    ("srun: error: vm: task 1: Exited with exit code 2\nsrun: error: vm: task 0: Terminated\n", 143, False),
    ("srun: error: vm: task 0: Exited with exit code 75\nsrun: error: vm: task 1: Exited with exit code 1\n", 75,
     False),  # a task failed for real
    ("srun: error: vm: task 0: Killed\n", 137, False),
    ("srun: error: vm: task 1: Exited with exit code 130\nsrun: error: vm: task 0: Terminated\n", 143, False),
    ("step 3: loss 75\nsrun: error: vm: task 0: Exited with exit code 75 (no)\n", 143, False),
])
def test_requeue_follows_the_tasks_exit_codes_not_sruns_status(stubs, report, status, requeued):  # noqa: F811
    """A signal that reached the tasks alone: the launcher requeues when every task srun saw exit
    exited 75, however srun's --kill-on-bad-exit status came out, and not when one failed otherwise."""
    env, log = stubs
    srun = Path(env["PATH"].split(":")[0]) / "srun"
    srun.write_text(f'#!/bin/bash\necho "srun $*" >> {log}\nprintf "%s" "$STUB_REPORT" >&2\nexit "$STUB_EXIT"\n')
    proc = subprocess.run(["bash", str(ROOT / "launchers" / "distill.sh"), "--no-container", "--tp", "8"],
                          env={**env, "STUB_REPORT": report, "STUB_EXIT": str(status)},
                          capture_output=True, text=True, timeout=60)
    assert report in proc.stderr  # srun's stderr still reaches the job's log
    calls = log.read_text().splitlines()
    if requeued:
        assert proc.returncode == 0, proc.stderr
        assert f"the tasks stopped at a pre-emption checkpoint (exit 75; srun's status {status})" in proc.stdout
        assert calls[-1] == "scontrol requeue 4242"
    else:
        assert proc.returncode == status and "requeue" not in proc.stdout, proc.stdout
        assert not any(c.startswith("scontrol requeue") for c in calls)


@pytest.mark.parametrize(("job_info", "requeued"), [
    ("JobId=4242 JobState=RUNNING Reason=None", True),  # a pre-emption warning (--signal=B:USR1@T)
    ("JobId=4242 JobState=COMPLETING Reason=TimeLimit", True),  # the time limit's SIGTERM
    ("JobId=4242 JobState=COMPLETING Reason=None", False),  # scancel JOB, as the real cluster shows it
    ("JobId=4242 JobState=CANCELLED Reason=None", False),
])
def test_a_cancelled_job_is_not_requeued(stubs, job_info, requeued):  # noqa: F811
    """SIGTERM reaches the launcher from a time limit, a pre-emption and `scancel JOB` alike; the
    job's state tells a cancel apart, and a cancelled job is not requeued (which would undo it)."""
    env, log = stubs
    scontrol = Path(env["PATH"].split(":")[0]) / "scontrol"
    scontrol.write_text(f'#!/bin/bash\necho "scontrol $*" >> {log}\n'
                        f'if [ "$1 $2" = "show job" ]; then echo "{job_info}"; fi\n')
    proc = subprocess.Popen(["bash", str(ROOT / "launchers" / "distill.sh"), "--no-container", "--tp", "8"],
                            env={**env, "STUB_WAIT_FOR_USR1": "1"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not (log.exists() and "srun " in log.read_text()):
        time.sleep(0.1)
    time.sleep(0.3)
    proc.send_signal(15)
    out, err = proc.communicate(timeout=30)
    calls = log.read_text().splitlines()
    assert "[launcher] pre-emption signal: checkpointing" in out and "srun got USR1" in calls, out + err
    assert ("scontrol requeue 4242" in calls) == requeued, calls
    assert ("[launcher] job 4242 was cancelled: not requeueing" in out) == (not requeued), out


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
    # `sbatch --wait` returns at the job's exit; under load the controller may still show COMPLETING
    assert slurm_cluster.wait_job(_job_id(proc), timeout=120) == "COMPLETED"

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
            f"data.train={root / 'train.jsonl'}", f"data.valid={root / 'valid.jsonl'}",
            f"data.cache_dir={root / 'cache'}",
            f"train.steps={STEPS}", "train.global_batch_size=4", "train.seq_length=32", "train.log_interval=1",
            "train.progress_bar=false", "optim.warmup_steps=2", "loss.intermediate=[1:3]", "loss.kind=jsd",
            "dtype=float32"]


def _records(text: str) -> list[dict]:
    """The JSON lines of a log (a stage's result is its last)."""
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def _last_json(text: str) -> dict:
    return _records(text)[-1]


def assert_equals_reference(text: str, final: Path, torchrun_reference) -> None:
    """The job's log `text` ends with the result of the uninterrupted torchrun run, and its `final`
    checkpoint holds the same weights."""
    ref_out, expected = torchrun_reference
    result = _last_json(text)
    assert result["step"] == expected["step"] == STEPS and result["valid"] == expected["valid"]
    assert_same_weights(final, ref_out / "final")


def assert_same_weights(ours: Path, ref: Path) -> None:
    """Bitwise equal: the same ranks run the same ops in the same order under srun as under torchrun
    (stricter than the TP=2-versus-TP=1 tests' atol=1e-4, which compare different layouts)."""
    [(a, b)] = run_distributed(global_weights, world_size=1, args=(str(ours), str(ref)))
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


def submit_distill(cluster: SlurmCluster, inputs: Path, out: Path, log: Path, *sbatch: str,
                   overrides: tuple[str, ...] = ()) -> str:
    """`sbatch ... launchers/distill.sh --no-container --tp 2 ...` from the repository, as a user submits
    it; the job's id."""
    return _job_id(cluster.run("sbatch", "--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=0", f"--output={log}",
                       f"--chdir={log.parent}", *sbatch, "launchers/distill.sh", "--no-container", "--tp", "2",
                       *distill_overrides(inputs, out), *overrides, env=job_env(cluster), cwd=ROOT))


def wait_for_log(cluster: SlurmCluster, job: str, log: Path, text: str, timeout: float = 300) -> None:
    """Until the job's log shows `text` (the job still pending or running meanwhile)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not (log.exists() and text in log.read_text()):
        assert cluster.job_state(job) in ("PENDING", "CONFIGURING", "RUNNING"), log.read_text()
        time.sleep(0.2)
    assert text in log.read_text(), f"the job never logged {text!r}:\n{log.read_text()}"


@pytest.mark.slurm
@pytest.mark.slow
def test_distill_job_equals_torchrun(slurm_cluster, distill_inputs, torchrun_reference, tmp_path):
    log = tmp_path / "distill.out"
    job = submit_distill(slurm_cluster, distill_inputs, tmp_path / "run", log)
    state = slurm_cluster.wait_job(job, timeout=600)
    text = log.read_text()
    assert state == "COMPLETED", text[-4000:]
    assert "[launcher] stage=distill nodes=1 gpus/node=2 world=2 tp=2 pp=1 dp=1 container=none" in text
    assert "world=2 tp=2 pp=1 dp=1" in text.split("[launcher] no container", 1)[1]  # the stage's own layout line
    assert_equals_reference(text, tmp_path / "run" / "final", torchrun_reference)


@pytest.mark.slurm
@pytest.mark.slow
@pytest.mark.parametrize("to", ["batch-shell", "tasks"])
def test_preempted_distill_job_requeues_and_resumes_to_the_same_weights(slurm_cluster, distill_inputs,
                                                                      torchrun_reference, tmp_path, to):
    """A pre-emption signal after step 3; the job checkpoints, the launcher requeues it, Slurm runs it
    again and it resumes to the weights of the uninterrupted torchrun run.

    - batch-shell: `scancel --signal=USR1 --batch` (what --signal=B:USR1@T does before the time
      limit) reaches the launcher, which forwards it to the tasks.
    - tasks: `scancel --signal=USR1` signals the tasks, not the launcher: they checkpoint and exit 75,
      and srun reports 75 or, having terminated the task that had not exited yet, 143; the launcher
      reads srun's per-task report and requeues either way. Step checkpoints come before the signal,
      so the writer manager of the first save must outlive the signal Slurm sends every process of
      the step (`writer_processes`)."""
    log = tmp_path / "distill.out"
    overrides = ("train.save_interval=2",) if to == "tasks" else ()
    job = submit_distill(slurm_cluster, distill_inputs, tmp_path / "run", log, "--open-mode=append",
                         overrides=overrides)
    wait_for_log(slurm_cluster, job, log, "step 3:")
    slurm_cluster.run("scancel", "--signal=USR1", *(["--batch"] if to == "batch-shell" else []), job)
    state = slurm_cluster.wait_job(job, timeout=600)
    text = log.read_text()
    assert state == "COMPLETED", text[-4000:]
    assert slurm_cluster.job_field(job, "Restarts") == "1", text[-4000:]
    if to == "batch-shell":
        assert "[launcher] pre-emption signal: checkpointing" in text
    else:
        assert "[launcher] pre-emption signal" not in text  # the launcher's shell was not signalled
        assert re.search(r"\[launcher\] the tasks stopped at a pre-emption checkpoint \(exit 75; srun's status "
                         r"(75|143)\)", text), text[-4000:]
    assert f"[launcher] requeueing job {job}; the stage resumes from its last checkpoint" in text
    [stopped] = [r for r in _records(text) if r.get("interrupted")]
    assert 3 <= stopped["step"] < STEPS and f"(step {stopped['step']})" in text  # where the second run resumed
    assert "Traceback" not in text
    assert_equals_reference(text, tmp_path / "run" / "final", torchrun_reference)


@pytest.mark.slurm
@pytest.mark.slow
@pytest.mark.parametrize("how", ["kill-tasks", "scancel"])
def test_killed_distill_job_leaves_complete_checkpoints_and_a_resubmission_resumes(slurm_cluster, distill_inputs,
                                                                                  torchrun_reference, tmp_path, how):
    """A job ended mid-run: its tasks SIGKILLed (`scancel --signal=KILL JOB.0`: no chance to save; the
    job FAILED), or the job cancelled (`scancel JOB`: SIGTERM, on which the tasks checkpoint, then
    SIGKILL after KillWait; CANCELLED, and the launcher does not requeue it). Neither is requeued; the
    output has no `final/` and only complete step checkpoints (a save cut short stays
    `step_N.partial`, which nothing resumes from), `minitron check` passes on the newest, and the same
    sbatch command again resumes from it and ends bitwise equal to the uninterrupted run."""
    from nemo_minitron import checkpoint
    from nemo_minitron.train import state as train_state

    out, log = tmp_path / "run", tmp_path / "distill.out"
    submit = lambda: submit_distill(slurm_cluster, distill_inputs, out, log, "--open-mode=append",  # noqa: E731
                                    overrides=("train.save_interval=4",))
    job = submit()
    wait_for_log(slurm_cluster, job, log, "step 10:")
    slurm_cluster.run("scancel", *(["--signal=KILL", f"{job}.0"] if how == "kill-tasks" else [job]))
    state = slurm_cluster.wait_job(job, timeout=300)
    text = log.read_text()
    assert state == ("FAILED" if how == "kill-tasks" else "CANCELLED"), text[-4000:]
    assert slurm_cluster.job_field(job, "Restarts") == "0" and "[launcher] requeueing" not in text, text[-4000:]
    if how == "kill-tasks":
        assert re.search(r"srun: error: \S+: tasks? [0-9,-]+: Killed", text), text[-4000:]
    # after `scancel JOB` the launcher logs "[launcher] job ID was cancelled: not requeueing" when srun
    # ends within KillWait; otherwise Slurm SIGKILLs it first: not requeued either way
    assert not list(out.glob("final*")), sorted(p.name for p in out.iterdir())
    saved = train_state.complete_checkpoints(out)
    steps = [int(p.name.removeprefix("step_")) for p in saved]
    if how == "kill-tasks":  # no chance to save: the step checkpoints of save_interval=4
        assert steps == [4, 8], sorted(p.name for p in out.rglob("*"))
    else:  # scancel's SIGTERM asks for a checkpoint too, saved when it finishes within KillWait
        assert steps[0] >= 4 and steps[-1] >= 8 and steps == sorted(steps), sorted(p.name for p in out.rglob("*"))
    leftovers = {p.name for p in (out / train_state.CHECKPOINTS_DIR).iterdir()} - {p.name for p in saved}
    assert all(re.fullmatch(r"step_\d{7}\.partial", name) for name in leftovers), leftovers
    for step in saved:
        checkpoint.verify_checkpoint(step / train_state.MODEL_DIR)
        assert (step / train_state.TRAINER_FILE).is_file()
    check = subprocess.run([str(VENV_BIN / "minitron"), "check", f"checkpoint={saved[-1] / train_state.MODEL_DIR}"],
                           capture_output=True, text=True, timeout=300, env=job_env(slurm_cluster))
    assert check.returncode == 0 and _last_json(check.stdout)["ok"] is True, check.stdout + check.stderr

    again = submit()
    state = slurm_cluster.wait_job(again, timeout=600)
    text = log.read_text()
    assert state == "COMPLETED", text[-4000:]
    resumed = int(saved[-1].name.removeprefix("step_"))
    assert f"(step {resumed})" in text, text[-4000:]  # where the second job resumed
    assert_equals_reference(text, out / "final", torchrun_reference)


# --- the other launchers: the pipeline, a recipe, the search's retraining jobs --------------------

def submit(cluster: SlurmCluster, script: str, log: Path, *args: str, tasks: int = 1, env: dict | None = None) -> str:
    """`sbatch --nodes=1 --ntasks-per-node=TASKS --gpus-per-node=0 launchers/SCRIPT --no-container ARGS`."""
    return _job_id(cluster.run("sbatch", "--nodes=1", f"--ntasks-per-node={tasks}", "--gpus-per-node=0",
                               f"--output={log}", f"--chdir={log.parent}", f"launchers/{script}", "--no-container",
                               *args, env=env or job_env(cluster), cwd=ROOT))


@pytest.mark.slurm
@pytest.mark.slow
def test_pipeline_job_takes_the_tiny_teacher_to_results(slurm_cluster, tiny_teacher_source, tmp_path):
    """`pipeline.sh` on one task: import, corpus (the user's file alone), prune, distill, export,
    evaluate, as tests/test_cli.py runs the pipeline on a tiny Hugging Face teacher."""
    from tiny import short_correction, user_corpus

    work, log = tmp_path / "work", tmp_path / "pipeline.out"
    job = submit(slurm_cluster, "pipeline.sh", log, f"work_dir={work}", f"teacher.hf_path={tiny_teacher_source / 'hf'}",
                 *user_corpus(tmp_path / "docs.jsonl"), "prune.calib.num_samples=8", "prune.calib.seq_len=16",
                 "prune.loss_samples=2", "prune.target.num_layers=3", "prune.target.ffn_hidden_size=64",
                 "distill.train.steps=2", "distill.train.seq_length=16",
                 "distill.optim.warmup_steps=1", "distill.train.save_interval=0", "eval.seq_len=16",
                 "eval.max_tokens=256", *short_correction(16))
    state = slurm_cluster.wait_job(job, timeout=900)
    text = log.read_text()
    assert state == "COMPLETED", text[-4000:]
    assert "[launcher] stage=pipeline nodes=1 gpus/node=1 world=1 tp=1 pp=1 dp=1 container=none" in text
    results = json.loads((work / "results.json").read_text())
    assert _last_json(text) == results
    assert list(results["stage_seconds"])[:5] == ["import", "corpus", "teacher_correct", "prune", "distill"]
    assert 1 < results["student"]["heldout_perplexity"] < 1e4, results["student"]
    assert (work / "report.md").is_file() and "[launcher] requeueing" not in text


@pytest.mark.slurm
@pytest.mark.slow
def test_recipe_launcher_keeps_the_recipes_settings_that_are_not_overridden(slurm_cluster, distill_inputs, tmp_path):
    """`distill_mn8b.sh` (32 nodes, --tp 8 by default) shrunk to the tiny models on one task: the
    model, data and train.* overrides win, the recipe's LR schedule and loss are the ones the job used."""
    root, out, log = distill_inputs, tmp_path / "run", tmp_path / "recipe.out"
    job = submit(slurm_cluster, "distill_mn8b.sh", log, "--tp", "1", f"teacher={root / 'teacher'}",
                 f"student={root / 'student'}", f"output_dir={out}", f"data.train={root / 'train.jsonl'}",
                 f"data.valid={root / 'valid.jsonl'}", f"data.cache_dir={root / 'cache'}", "train.steps=3",
                 "train.global_batch_size=2", "train.seq_length=32", "train.eval_batches=1", "train.log_interval=1",
                 "train.progress_bar=false", "optim.warmup_steps=1", "dtype=float32")
    state = slurm_cluster.wait_job(job, timeout=600)
    text = log.read_text()
    assert state == "COMPLETED", text[-4000:]
    assert "[launcher] stage=distill nodes=1 gpus/node=1 world=1 tp=1 pp=1 dp=1 container=none" in text
    assert "loss fwd_kl" in text  # the stage's own first line
    result = _last_json(text)
    assert result["step"] == 3 and result["interrupted"] is False
    settings = json.loads((out / "nemo_minitron_output.json").read_text())["settings"]
    flat = {}

    def walk(node, prefix=""):
        for key, value in node.items():
            if isinstance(value, dict):
                walk(value, f"{prefix}{key}.")
            else:
                flat[f"{prefix}{key}"] = value
    walk(settings)
    # the recipe's (nemo_minitron/conf/recipes/mn_minitron_8b.yaml, block distill)
    assert {k: flat.get(k) for k in ("optim.lr", "optim.min_lr", "loss.kind", "loss.temperature", "loss.lm_weight",
                                     "train.micro_batch_size")} == {
        "optim.lr": 1.0e-4, "optim.min_lr": 4.5e-7, "loss.kind": "fwd_kl", "loss.temperature": 1.0,
        "loss.lm_weight": 0.0, "train.micro_batch_size": 1}, flat
    # the overrides
    assert {k: flat.get(k) for k in ("train.steps", "train.global_batch_size", "train.seq_length", "optim.warmup_steps",
                                     "dtype")} == {"train.steps": 3, "train.global_batch_size": 2,
                                                   "train.seq_length": 32, "optim.warmup_steps": 1,
                                                   "dtype": "float32"}, flat
    # the LR the steps used: warm-up to the recipe's peak at step 1, then its cosine towards min_lr
    lrs = [float(m) for m in re.findall(r"step \d+: .*?train/lr=([0-9.e+-]+)", text)]
    assert lrs[0] == pytest.approx(1.0e-4) and lrs[-1] < lrs[0], lrs


@pytest.mark.slurm
@pytest.mark.slow
def test_search_submits_its_retraining_jobs_and_a_rerun_collects_them(slurm_cluster, tiny_teacher_source, tmp_path):
    """`minitron search search.launcher=slurm` on the tiny teacher: the two best candidates by zero-shot
    loss are retrained by real `launchers/distill.sh` jobs (MINITRON_CONTAINER=none in the environment
    the jobs inherit stands for --no-container); the same command after they finished ranks them."""
    from shared import copy_tiny_teacher
    from test_search import search_args
    from tiny import SENTENCES

    root = tmp_path / "inputs"
    copy_tiny_teacher(tiny_teacher_source, root)
    for split, shift in (("calib", 0), ("train", 1), ("valid", 2)):
        docs = [" ".join(SENTENCES[(i + shift) % 4:] + SENTENCES[: (i + shift) % 4]) * 3 for i in range(16)]
        (root / f"{split}.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    out, logs = tmp_path / "out", tmp_path / "logs"
    logs.mkdir()
    sbatch_args = f"--gpus-per-node=0 --ntasks-per-node=1 --output={logs}/%x-%j.out --chdir={tmp_path}"
    cmd = [str(VENV_BIN / "minitron"), *search_args(root, out, "search.max_candidates=2", "search.top_k=2",
                                                      "search.launcher=slurm", f"search.sbatch_args='{sbatch_args}'")]
    env = {**job_env(slurm_cluster), "MINITRON_CONTAINER": "none"}

    first = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert first.returncode == 0, first.stderr[-4000:]
    submitted = _last_json(first.stdout)
    assert submitted["status"] == "retraining" and len(submitted["jobs"]) == 2, submitted
    jobs = {name: json.loads((out / "candidates" / name / "result.json").read_text())["job"]
            for name in submitted["jobs"]}
    for name, job in jobs.items():
        state = slurm_cluster.wait_job(job, timeout=600)
        [job_log] = logs.glob(f"minitron-search-{name}-{job}.out")
        text = job_log.read_text()
        assert state == "COMPLETED", text[-4000:]
        assert "[launcher] stage=distill nodes=1 gpus/node=1 world=1 tp=1 pp=1 dp=1 container=none" in text
        assert _last_json(text)["step"] == 2

    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert again.returncode == 0, again.stderr[-4000:]
    result = _last_json(again.stdout)
    assert result["status"] == "done" and result["retrained"] == 2, result
    report = json.loads((out / "report.json").read_text())
    assert report["launcher"] == "slurm" and report["winner"]["name"] == result["winner"]["name"]
    rows = report["candidates"]
    assert {r["name"] for r in rows} == set(jobs) and rows[0]["retrained_loss"] <= rows[1]["retrained_loss"]
    assert report["winner"]["retrained"] == str(out / "candidates" / rows[0]["name"] / "distill" / "final")
    assert (out / "winner").is_dir()
