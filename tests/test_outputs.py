"""Output safety: no stage writes into the current directory, into or around its inputs, or into a
directory holding what it did not write; every refusal leaves the files byte for byte as they were
and is one `error:` line on the command line. Re-running a stage into its own output still works.
A second run into a directory that another run is writing is refused at once."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from commands import ENV, last_json, minitron
from tiny import tiny_arch, write_hf_dir, write_sentence_docs


def snapshot(root: Path) -> dict[str, str]:
    """Every file under `root` with its content hash."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    from nemo_minitron.convert import ImportConfig, import_checkpoint

    root = tmp_path_factory.mktemp("outputs")
    write_hf_dir(root / "hf", tiny_arch(tie=True))
    import_checkpoint(ImportConfig(hf_path=str(root / "hf"), output_dir=str(root / "teacher")))
    return root / "teacher"


def test_export_into_the_current_directory_is_refused(teacher, tmp_path, monkeypatch):
    from nemo_minitron import UserError
    from nemo_minitron.convert import ExportHFConfig, export_hf

    work = tmp_path / "work"
    (work / "notes").mkdir(parents=True)
    (work / "notes" / "todo.txt").write_text("mine\n")
    before = snapshot(work)
    monkeypatch.chdir(work / "notes")
    for target in (".", ".."):
        with pytest.raises(UserError, match=rf"output_dir={target} is the current directory or one above it"):
            export_hf(ExportHFConfig(checkpoint=str(teacher), output_dir=target))
    assert snapshot(work) == before


@pytest.mark.parametrize("output", ["teacher", "teacher/pruned", "."], ids=["same", "inside", "above"])
def test_prune_never_writes_into_inside_or_above_its_input(teacher, output, tmp_path):
    from nemo_minitron import PruneConfig, UserError, prune_checkpoint

    before = snapshot(teacher.parent)
    out = teacher.parent / output
    with pytest.raises(UserError, match=rf"output_dir={out} overlaps the input {teacher}"):
        prune_checkpoint(PruneConfig(checkpoint=str(teacher), output_dir=str(out)))
    assert snapshot(teacher.parent) == before


def test_another_stages_output_or_foreign_files_are_refused(teacher, tmp_path):
    from nemo_minitron import UserError
    from nemo_minitron.convert import ExportHFConfig, ImportConfig, export_hf, import_checkpoint

    other = tmp_path / "other_teacher"
    import_checkpoint(ImportConfig(hf_path=str(teacher.parent / "hf"), output_dir=str(other)))
    before = snapshot(other)
    with pytest.raises(UserError, match=r"is not empty and holds the output of the import stage"):
        export_hf(ExportHFConfig(checkpoint=str(teacher), output_dir=str(other)))
    assert snapshot(other) == before

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("\\section{results}\n")
    with pytest.raises(UserError, match=r"holds files nemo-minitron did not write"):
        import_checkpoint(ImportConfig(hf_path=str(teacher.parent / "hf"), output_dir=str(mine)))
    assert (mine / "thesis.tex").read_text() == "\\section{results}\n" and len(list(mine.iterdir())) == 1
    (mine / "file").write_text("x")
    with pytest.raises(UserError, match=r"output_dir=.*/mine/file is a file"):
        export_hf(ExportHFConfig(checkpoint=str(teacher), output_dir=str(mine / "file")))


def test_rerunning_a_stage_into_its_own_output_still_works(teacher, tmp_path):
    from nemo_minitron.convert import ExportHFConfig, export_hf
    from nemo_minitron.outputs import MARKER_FILE

    out = tmp_path / "hf_export"
    for _ in range(2):
        export_hf(ExportHFConfig(checkpoint=str(teacher), output_dir=str(out)))
    assert (out / "config.json").is_file() and (out / MARKER_FILE).is_file()
    # every exported file, weights included, with the permissions of any file this process writes
    (tmp_path / "plain").write_text("")
    modes = {path.name: oct(path.stat().st_mode & 0o777) for path in out.iterdir() if path.is_file()}
    assert set(modes.values()) == {oct((tmp_path / "plain").stat().st_mode & 0o777)}, modes
    assert "model.safetensors" in modes
    empty = tmp_path / "empty"
    empty.mkdir()
    export_hf(ExportHFConfig(checkpoint=str(teacher), output_dir=str(empty)))
    assert (empty / "config.json").is_file()


@pytest.mark.slow
def test_command_line_reports_one_line_and_distill_refuses_its_student(teacher, tmp_path):
    data = write_sentence_docs(tmp_path / "train.jsonl", 8)
    before = snapshot(teacher)
    proc = minitron("distill", f"teacher={teacher}", f"student={teacher}", f"output_dir={teacher / 'run'}",
                    f"data.train={data}", "train.steps=1", "train.seq_length=32", "optim.warmup_steps=0", check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: output_dir={teacher / 'run'} overlaps the input {teacher}: a stage never writes into, inside or "
        f"above its inputs; choose another output_dir")
    assert snapshot(teacher) == before
    # a pipeline work_dir is checked the same way, before any stage runs
    work = tmp_path / "work"
    work.mkdir()
    (work / "keep.txt").write_text("keep")
    proc = minitron("pipeline", f"work_dir={work}", check=False)
    assert proc.returncode == 2 and "work_dir=" in proc.stderr and "did not write" in proc.stderr
    assert os.listdir(work) == ["keep.txt"]
    assert last_json(minitron("prune", f"checkpoint={teacher}", f"output_dir={tmp_path / 'p'}", "plan_only=true",
                              "target.ffn_hidden_size=48"))["student"]["ffn_hidden_size"] == 48


def _claim(path: str) -> bool:
    from nemo_minitron.outputs import MARKER_FILE, claim_output

    claim_output(path, "distill")
    return (Path(path) / MARKER_FILE).is_file()


@pytest.mark.slow
def test_claim_on_several_ranks_sees_no_half_written_marker(tmp_path):
    """Every rank checks the new directory before rank 0 marks it, so no rank mistakes rank 0's
    marker-in-progress for foreign files."""
    from distributed import run_distributed

    out = str(tmp_path / "run")
    assert run_distributed(_claim, world_size=2, tp=2, args=(out,)) == [True, True]
    assert run_distributed(_claim, world_size=2, tp=2, args=(out,)) == [True, True]  # a re-run is its own output


_HOLD = """import sys
from pathlib import Path
from nemo_minitron.outputs import lock_output
lock_output(Path(sys.argv[1]).resolve(), "output_dir=" + sys.argv[1])
print("locked", flush=True)
sys.stdin.read()
"""


@contextmanager
def written_by_another_run(out: Path) -> Iterator[subprocess.Popen]:
    """Another process holding `out`'s output lock until the block ends (it then exits normally)."""
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True, env=ENV)
    try:
        assert holder.stdout.readline() == "locked\n"
        yield holder
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)


def test_a_second_writer_is_refused_at_once_and_runs_when_the_first_ends(teacher, tmp_path):
    from nemo_minitron.outputs import lock_path

    out = tmp_path / "export"
    with written_by_another_run(out) as holder:
        proc = minitron("export-hf", f"checkpoint={teacher}", f"output_dir={out}", check=False)
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        assert proc.returncode == 2 and len(errors) == 1, proc.stderr
        assert errors[0].startswith(f"error: output_dir={out} is being written by another run (pid {holder.pid} on ")
        assert errors[0].endswith("wait for it to end, or choose another directory")
        assert not out.exists() and lock_path(out).is_file()
    assert not lock_path(out).exists()  # its holder removed it on exit
    assert last_json(minitron("export-hf", f"checkpoint={teacher}", f"output_dir={out}"))["hf_dir"] == str(out)
    assert not lock_path(out).exists() and (out / "config.json").is_file()


def test_output_locks_are_reentrant_end_with_their_stage_and_outlive_a_killed_holder(tmp_path):
    from nemo_minitron import UserError
    from nemo_minitron.outputs import MARKER_FILE, check_output, lock_output, lock_path, releases_output_locks

    out = tmp_path / "out"

    @releases_output_locks
    def stage() -> bool:
        lock_output(out, "output_dir=out")
        lock_output(out, "output_dir=out")  # this process already writes it: no conflict with itself
        return lock_path(out).is_file()

    assert stage() and not lock_path(out).exists()
    with written_by_another_run(out) as holder:
        with pytest.raises(UserError, match=rf"output_dir=out is being written by another run \(pid {holder.pid} "):
            stage()
        assert lock_path(out).is_file()  # the holder's, untouched by the refused run
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(timeout=60)
    assert lock_path(out).is_file()  # a killed holder leaves its file, and the kernel its lock
    assert stage() and not lock_path(out).exists()
    # a sub-output's lock file that a killed run left is not "foreign" to overwrite=true
    out.mkdir()
    (out / MARKER_FILE).write_text('{"stage": "pipeline", "entries": ["pruned"]}')
    (out / ".pruned.lock").write_text("pid 1 on elsewhere")
    releases_output_locks(check_output)(out, "pipeline", overwrite=True, own=["pruned"])
