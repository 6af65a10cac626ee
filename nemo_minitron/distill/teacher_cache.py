"""An offline teacher: the teacher's top-k logits for every token of a distillation run's samples,
written once (`write_teacher_cache`, `minitron teacher-logits`) and read by distillation
(`TeacherCache`, `minitron distill teacher_cache=DIR`) instead of running the teacher beside the
student.

Per token a cache keeps what `TopKTeacher` (distill/losses.py) holds: the teacher's k largest logits
in descending order, in its compute dtype (bf16 logits cost 2 bytes and round-trip exactly), their
vocabulary ids (int32), the log-partition and the log of the probability mass outside the k (fp32);
and the sample itself: tokens, labels (int32) and loss mask (uint8). A cache is therefore a dataset:
distillation draws its samples from it, so they cannot fall out of line with the logits.
Bytes per token: k x (value bytes + 4) + 17.

Layout of a cache directory:

    manifest.json   k, seq_length, samples per split, dtypes, writers and rows per file, the
                    teacher, its tokenizer's fingerprint and the data it read
    progress.json   global batches finished per split, rewritten (atomically) after every batch
                    once every writer has flushed it: a crashed run loses at most the batch in
                    flight, SIGTERM / SIGUSR1 stop it after a finished batch (exit 75), and running
                    the same command again resumes
    SPLIT/wWWWWW-fFFFFF/NAME.npy   memory-mapped [rows, seq_length(, k)] arrays of writer W, file F

A split of S samples is written in global batches of G samples by D data-parallel replicas of G/D
samples each, so sample i lives with writer (i mod G) // (G/D), at row (i // G) x G/D + i mod G/D,
in file row // rows_per_file. Each writer (the first TP rank of the last pipeline stage of its
replica) writes only its own files: no two processes ever write one file, which keeps shared file
systems safe. Files hold whole batches and are capped near `FILE_BYTES`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from tqdm.auto import tqdm

from nemo_minitron import atomic, parallel
from nemo_minitron.distill.losses import TopKTeacher, teacher_top_k
from nemo_minitron.errors import UserError
from nemo_minitron.train.signals import PreemptionHandler

if TYPE_CHECKING:
    from nemo_minitron.train.config import TrainConfig

log = logging.getLogger("nemo_minitron")

MANIFEST_FILE = "manifest.json"
PROGRESS_FILE = "progress.json"
SPLITS = ("valid", "train")          # written in this order: the small held-out split first
ENTRIES = (MANIFEST_FILE, PROGRESS_FILE, *SPLITS)   # everything a cache directory holds
FILE_BYTES = 1 << 30
FORMAT_VERSION = 1
# numpy has no bfloat16: those logits are stored as their raw 16 bits.
_STORED = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16}
_SAMPLE_ARRAYS = {"tokens": np.int32, "labels": np.int32, "loss_mask": np.uint8}
_TEACHER_ARRAYS = {"indices": np.int32, "log_partition": np.float32, "log_tail": np.float32}


def bytes_per_token(k: int, values_dtype: str) -> int:
    return k * (np.dtype(_STORED[values_dtype]).itemsize + 4) + 4 + 4 + 4 + 4 + 1


@dataclass(frozen=True)
class SplitLayout:
    """Where the samples of one split live (see the module docstring)."""

    samples: int
    global_batch_size: int
    writers: int
    rows_per_file: int

    @property
    def per_writer(self) -> int:
        return self.global_batch_size // self.writers

    @property
    def batches(self) -> int:
        return self.samples // self.global_batch_size

    def locate(self, sample: int) -> tuple[int, int, int]:
        """(writer, file, row within the file) of `sample`."""
        g, w = self.global_batch_size, self.per_writer
        row = (sample // g) * w + sample % w
        return (sample % g) // w, row // self.rows_per_file, row % self.rows_per_file

    def file_rows(self, file: int) -> int:
        """Rows of file `file` of any writer (the last one may be short)."""
        rows = self.batches * self.per_writer
        return min(self.rows_per_file, rows - file * self.rows_per_file)


def _file_dir(root: Path, split: str, writer: int, file: int) -> Path:
    return root / split / f"w{writer:05d}-f{file:05d}"


def _shapes(seq_length: int, k: int) -> dict[str, tuple[int, ...]]:
    return {**{name: (seq_length,) for name in (*_SAMPLE_ARRAYS, "log_partition", "log_tail")},
            "values": (seq_length, k), "indices": (seq_length, k)}


def _dtypes(values_dtype: str) -> dict[str, Any]:
    return {**_SAMPLE_ARRAYS, **_TEACHER_ARRAYS, "values": _STORED[values_dtype]}


# --- reading ---------------------------------------------------------------------------------------

class TeacherCache:
    """A complete cache directory (UserError otherwise); `samples(split)` is its dataset."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self.manifest = json.loads((self.path / MANIFEST_FILE).read_text())
            progress = json.loads((self.path / PROGRESS_FILE).read_text())
        except (OSError, ValueError):
            raise UserError(f"teacher_cache={path} is not a teacher cache (no readable {MANIFEST_FILE} and "
                            f"{PROGRESS_FILE}): write one with `minitron teacher-logits`") from None
        if self.manifest.get("format") != FORMAT_VERSION:
            raise UserError(f"teacher_cache={path} has format {self.manifest.get('format')}, this version reads "
                            f"{FORMAT_VERSION}: write it again with `minitron teacher-logits`")
        self.layouts = {split: SplitLayout(**spec) for split, spec in self.manifest["splits"].items()}
        missing = {s: f"{progress.get(s, 0)} of {lay.batches}" for s, lay in self.layouts.items()
                   if progress.get(s, 0) < lay.batches}
        if missing:
            done = "; ".join(f"{s}: {n} global batches" for s, n in missing.items())
            raise UserError(f"teacher_cache={path} is incomplete ({done}): run the same `minitron teacher-logits` "
                            f"command again to finish it")
        self._check_files()
        self.id = hashlib.sha256((self.path / MANIFEST_FILE).read_bytes()).hexdigest()[:16]

    def _check_files(self) -> None:
        """Every array file present, readable and of the dtype and shape the layout implies (its
        header and size, not its rows): a truncated or missing file is refused here, naming it,
        instead of failing in the middle of a run."""
        shapes, dtypes = _shapes(self.seq_length, self.k), _dtypes(self.manifest["values_dtype"])
        for split, layout in self.layouts.items():
            files = -(-layout.batches * layout.per_writer // layout.rows_per_file)
            for writer, file, (name, dtype) in itertools.product(range(layout.writers), range(files), dtypes.items()):
                path = _file_dir(self.path, split, writer, file) / f"{name}.npy"
                expected = (layout.file_rows(file), *shapes[name])
                try:
                    array = np.load(path, mmap_mode="r")
                except (OSError, ValueError) as err:
                    raise UserError(f"teacher_cache={self.path}: {path} is damaged or missing ({type(err).__name__}: "
                                    f"{str(err).splitlines()[0]}): write the cache again with `minitron "
                                    f"teacher-logits` into a new output_dir") from None
                if array.shape != expected or array.dtype != np.dtype(dtype):
                    raise UserError(f"teacher_cache={self.path}: {path} holds {array.dtype} {array.shape}, not "
                                    f"{np.dtype(dtype)} {expected}: write the cache again into a new output_dir")

    @property
    def k(self) -> int:
        return self.manifest["top_k"]

    @property
    def seq_length(self) -> int:
        return self.manifest["seq_length"]

    def samples(self, split: str) -> "CachedSamples | None":
        """The split as a map-style dataset (None if the cache has no samples of it)."""
        layout = self.layouts.get(split)
        return CachedSamples(self, split, layout) if layout and layout.samples else None

    def check_run(self, train: TrainConfig) -> None:
        """UserError naming the key unless a run with these `train.*` settings (its
        `TrainConfig.SAMPLE_KEYS`, as the writer's) can draw its samples from the cache.
        A cache written without held-out data (`teacher-logits` without `data.valid`) holds no valid
        split: a run from it validates on nothing, as a run with `teacher=` and no held-out data does."""
        seq_length, train_samples, valid_samples = train.seq_length, train.train_samples, train.valid_samples
        if seq_length != self.seq_length:
            raise UserError(f"train.seq_length={seq_length} differs from the teacher cache's {self.seq_length}: "
                            f"set train.seq_length={self.seq_length}")
        for split, needed, keys in (("train", train_samples, "train.steps x train.global_batch_size"),
                                    ("valid", valid_samples, "train.eval_batches x train.global_batch_size")):
            held = self.layouts[split].samples if split in self.layouts else 0
            if needed > held and not (split == "valid" and held == 0):
                raise UserError(f"{keys} = {needed} {split} samples, but teacher_cache={self.path} holds {held}: "
                                f"write a cache for the larger run, or train on fewer samples")


class CachedSamples:
    """Sample i of a cache split: tokens, labels, loss_mask and the teacher's top-k
    (`TopKTeacher.BATCH_KEYS`), as tensors read from the memory-mapped files."""

    def __init__(self, cache: TeacherCache, split: str, layout: SplitLayout):
        self.cache, self.split, self.layout = cache, split, layout
        self.values_dtype = cache.manifest["values_dtype"]
        self._open: dict[tuple[int, int], dict[str, np.ndarray]] = {}

    def __len__(self) -> int:
        return self.layout.samples

    def _arrays(self, writer: int, file: int) -> dict[str, np.ndarray]:
        if (writer, file) not in self._open:
            directory = _file_dir(self.cache.path, self.split, writer, file)
            self._open[(writer, file)] = {name: np.load(directory / f"{name}.npy", mmap_mode="r")
                                          for name in _dtypes(self.values_dtype)}
        return self._open[(writer, file)]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not 0 <= index < len(self):
            raise IndexError(f"sample {index} of a {self.split} split of {len(self)}")
        writer, file, row = self.layout.locate(index)
        rows = {name: np.array(a[row]) for name, a in self._arrays(writer, file).items()}
        if self.values_dtype == "bfloat16":
            rows["values"] = rows["values"].view(np.int16)
        arrays = {name: torch.from_numpy(value) for name, value in rows.items()}
        values = arrays.pop("values")
        if self.values_dtype == "bfloat16":
            values = values.view(torch.bfloat16)
        keys = TopKTeacher.BATCH_KEYS
        return {"tokens": arrays["tokens"].long(), "labels": arrays["labels"].long(),
                "loss_mask": arrays["loss_mask"].float(), keys["values"]: values,
                keys["indices"]: arrays["indices"].long(), keys["log_partition"]: arrays["log_partition"],
                keys["log_tail"]: arrays["log_tail"]}


# --- writing ---------------------------------------------------------------------------------------

def _rows_per_file(per_writer: int, seq_length: int, k: int, values_dtype: str, file_bytes: int) -> int:
    """Whole batches of one writer per file, at most `file_bytes` (at least one batch)."""
    batch_bytes = per_writer * seq_length * bytes_per_token(k, values_dtype)
    return per_writer * max(1, file_bytes // batch_bytes)


class _Writer:
    """One data-parallel replica's files: rows arrive a batch at a time; `flush` makes them durable."""

    def __init__(self, root: Path, split: str, layout: SplitLayout, writer: int, shapes, dtypes):
        self.root, self.split, self.layout, self.writer = root, split, layout, writer
        self.shapes, self.dtypes = shapes, dtypes
        self.file: int | None = None
        self.arrays: dict[str, np.memmap] = {}

    def _open(self, file: int) -> None:
        self.flush()
        directory = _file_dir(self.root, self.split, self.writer, file)
        directory.mkdir(parents=True, exist_ok=True)
        rows = self.layout.file_rows(file)
        self.arrays = {}
        for name, dtype in self.dtypes.items():
            path = directory / f"{name}.npy"
            shape = (rows, *self.shapes[name])
            # An interrupted run left this file: keep its finished rows, rewrite the rest.
            mode = "r+" if path.exists() else "w+"
            array = np.lib.format.open_memmap(path, mode=mode, dtype=dtype, shape=shape if mode == "w+" else None)
            if array.shape != shape or array.dtype != np.dtype(dtype):
                raise UserError(f"{path} holds {array.dtype} {array.shape}, not {np.dtype(dtype)} {shape}: the cache "
                                f"directory was changed by hand; write the cache into a new output_dir")
            self.arrays[name] = array
        self.file = file

    def write(self, first_row: int, rows: dict[str, np.ndarray]) -> None:
        file, offset = divmod(first_row, self.layout.rows_per_file)
        if file != self.file:
            self._open(file)
        count = len(next(iter(rows.values())))
        for name, value in rows.items():
            self.arrays[name][offset : offset + count] = value

    def flush(self) -> None:
        for array in self.arrays.values():
            array.flush()


def _batch_rows(batch: dict[str, torch.Tensor], top: TopKTeacher, values_dtype: str) -> dict[str, np.ndarray]:
    """One micro-batch as numpy rows of the cache's arrays."""
    b, s = batch["tokens"].shape
    values = top.values.detach().cpu().reshape(b, s, -1).to(getattr(torch, values_dtype))
    values = values.view(torch.int16).numpy().view(np.uint16) if values_dtype == "bfloat16" else values.numpy()
    mask = batch.get("loss_mask")
    mask = torch.ones(b, s) if mask is None else mask
    if not torch.all((mask == 0) | (mask == 1)):
        raise UserError("the training data's loss_mask holds weights other than 0 and 1, which a teacher cache "
                        "stores as one byte per token")
    return {"tokens": batch["tokens"].numpy(), "labels": batch["labels"].numpy(), "loss_mask": mask.numpy(),
            "values": values, "indices": top.indices.reshape(b, s, -1).cpu().numpy(),
            "log_partition": top.log_partition.reshape(b, s).cpu().numpy(),
            "log_tail": top.log_tail.reshape(b, s).cpu().numpy()}


def write_teacher_cache(teacher, data, output_dir: str | Path, k: int, *, global_batch_size: int,
                        micro_batch_size: int, train_samples: int, valid_samples: int, manifest: dict[str, Any],
                        progress: bool = True, file_bytes: int = FILE_BYTES) -> dict[str, Any]:
    """Write the top-`k` cache of `teacher` (a `GPTModel`, any TP / PP / DP) over the first
    `valid_samples` of `data.valid` and `train_samples` of `data.train` (a `TrainingData`) into
    `output_dir`, resuming what an earlier call with the same arguments finished (collective).
    `manifest` adds what the caller records (teacher, tokenizer fingerprint, data). Returns sizes
    and timings."""
    from megatron.core import parallel_state as ps

    from nemo_minitron.models.gpt import arch_of
    from nemo_minitron.models.runner import forward_microbatches
    from nemo_minitron.train.data import micro_batches

    root = Path(output_dir)
    layout = parallel.layout()
    arch = arch_of(teacher)
    if k > arch.vocab_size:
        raise UserError(f"top_k={k} exceeds the teacher's vocabulary of {arch.vocab_size}")
    values_dtype = str(teacher.config.params_dtype).removeprefix("torch.")
    seq_length = data.train[0]["tokens"].shape[-1]
    per_writer = global_batch_size // layout.dp
    rows_per_file = _rows_per_file(per_writer, seq_length, k, values_dtype, file_bytes)
    splits = {split: SplitLayout(samples, global_batch_size, layout.dp, rows_per_file)
              for split, samples in (("valid", valid_samples), ("train", train_samples)) if samples}
    full_manifest = {"format": FORMAT_VERSION, "top_k": k, "seq_length": seq_length, "values_dtype": values_dtype,
                     "vocab_size": arch.vocab_size, "bytes_per_token": bytes_per_token(k, values_dtype),
                     "splits": {s: dataclasses.asdict(lay) for s, lay in splits.items()}, **manifest}
    done = _start(root, full_manifest)
    writes = ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0
    shapes, dtypes = _shapes(seq_length, k), _dtypes(values_dtype)
    total = sum(lay.batches for lay in splits.values())
    bar = tqdm(total=total, initial=sum(done.values()), unit="batch", desc="teacher logits", dynamic_ncols=True,
               disable=not (progress and parallel.is_main_process()))
    start, tokens, interrupted = time.perf_counter(), 0, False
    with PreemptionHandler() as preemption:
        for split, split_layout in splits.items():
            dataset = data.train if split == "train" else data.valid
            writer = _Writer(root, split, split_layout, layout.dp_rank, shapes, dtypes) if writes else None
            for step in range(done.get(split, 0), split_layout.batches):
                batches = micro_batches(dataset, step * global_batch_size, global_batch_size, micro_batch_size,
                                        layout.dp, layout.dp_rank)
                tops = forward_microbatches(teacher, batches, lambda logits, _: teacher_top_k(
                    logits.reshape(-1, logits.shape[-1]), k))
                if writer is not None:
                    row = step * per_writer
                    for batch, top in zip(batches, tops):
                        writer.write(row, _batch_rows(batch, top, values_dtype))
                        row += len(batch["tokens"])
                    writer.flush()
                parallel.barrier()  # every writer has flushed this batch before it counts as done
                done[split] = step + 1
                if parallel.is_main_process():
                    atomic.write_text(root / PROGRESS_FILE, json.dumps(done) + "\n")
                tokens += global_batch_size * seq_length
                bar.update(1)
                # SIGTERM / SIGUSR1 (Slurm's warning): stop at a finished batch; re-running resumes
                if preemption.requested():
                    interrupted = True
                    log.info("pre-emption signal: stopped after %s batch %d; re-run to resume", split, step + 1)
                    break
            if interrupted:
                break
    bar.close()
    seconds = time.perf_counter() - start
    stored = sum(f.stat().st_size for f in root.rglob("*.npy")) if parallel.is_main_process() else None
    return {"output_dir": str(root), "top_k": k, "values_dtype": values_dtype, "seq_length": seq_length,
            "samples": {s: lay.samples for s, lay in splits.items()}, "bytes_per_token": bytes_per_token(k, values_dtype),
            "stored_bytes": stored, "tokens_written": tokens, "seconds": round(seconds, 3),
            "tokens_per_s": tokens / seconds if tokens else None, "already_complete": tokens == 0,
            "interrupted": interrupted}


def _start(root: Path, manifest: dict[str, Any]) -> dict[str, int]:
    """Write the manifest of a new cache, or check it against an earlier run's and return the
    batches it finished per split (collective)."""
    path = root / MANIFEST_FILE
    if path.exists():
        earlier = json.loads(path.read_text())
        if earlier != json.loads(json.dumps(manifest)):
            changed = sorted(k for k in {*earlier, *manifest} if earlier.get(k) != manifest.get(k))
            raise UserError(f"{root} holds a teacher cache written with another layout or teacher ({', '.join(changed)} "
                            f"differ; the data-parallel size is part of the layout): resume it with the same "
                            f"settings and number of ranks, or write into a new output_dir")
        progress = json.loads((root / PROGRESS_FILE).read_text()) if (root / PROGRESS_FILE).exists() else {}
    else:
        progress = {}
    parallel.barrier()  # every rank has read before rank 0 writes
    if parallel.is_main_process() and not path.exists():
        root.mkdir(parents=True, exist_ok=True)
        atomic.write_text(path, json.dumps(manifest, indent=1) + "\n")
        atomic.write_text(root / PROGRESS_FILE, json.dumps(progress) + "\n")
    parallel.barrier()
    if progress:
        log.info("resuming the teacher cache in %s: %s global batches done", root,
                 ", ".join(f"{s} {n}" for s, n in progress.items()))
    return dict(progress)
