"""Training data: documents -> cached indexed datasets -> megatron `GPTDataset` -> micro-batches.

The loop reads any map-style dataset whose items are dicts of equal-shape tensors ("tokens" and
whatever the loss reads). Step k (0-based) consumes samples [k * G, (k + 1) * G) of the training
dataset, G the global batch size, split into contiguous equal parts over data-parallel replicas and
then into micro-batches, so the position in the data is just the number of completed steps.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nemo_minitron import parallel
from nemo_minitron.data.corpus import default_cache_dir, ensure_corpus, user_files
from nemo_minitron.data.indexed import _indexed_prefix, build_gpt_datasets, indexed_token_count, tokenize_to_indexed
from nemo_minitron.errors import UserError


def collate(samples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
    return {key: torch.stack([torch.as_tensor(s[key]) for s in samples]) for key in samples[0]}


def micro_batches(dataset, first_sample: int, global_batch_size: int, micro_batch_size: int,
                  dp: int, dp_rank: int) -> list[dict[str, torch.Tensor]]:
    """This replica's micro-batches of the global batch that starts at sample `first_sample`."""
    per_replica = global_batch_size // dp
    start = first_sample + dp_rank * per_replica
    return [
        collate([dataset[i] for i in range(s, s + micro_batch_size)])
        for s in range(start, start + per_replica, micro_batch_size)
    ]


class TokenWindows:
    """Samples of `seq_length` tokens (and next-token labels) cut from one token stream without
    overlap, in a seeded random order; index i >= len() wraps around (another epoch, same order).

    The in-memory counterpart of `GPTDataset` for small corpora, tests and benchmarks.
    """

    def __init__(self, stream, seq_length: int, seed: int = 0):
        stream = torch.as_tensor(np.asarray(stream), dtype=torch.long)
        count = (len(stream) - 1) // seq_length
        if count < 1:
            raise UserError(f"a stream of {len(stream)} tokens holds no window of seq_length={seq_length} + 1")
        order = torch.randperm(count, generator=torch.Generator().manual_seed(seed))
        starts = order * seq_length
        self.windows = torch.stack([stream[s : s + seq_length + 1] for s in starts.tolist()])

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        window = self.windows[index % len(self.windows)]
        return {"tokens": window[:-1], "labels": window[1:]}


def default_data_cache() -> Path:
    return default_cache_dir() / "training"


def tokenizer_fingerprint(tokenizer) -> str:
    """A digest of the vocabulary and EOS id: equal for tokenizers that map text to the same ids."""
    vocab = json.dumps(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(f"{vocab}|{tokenizer.eos_token_id}".encode()).hexdigest()


def indexed_prefix(path: str | os.PathLike, tokenizer, cache_dir: Path, text_key: str = "text") -> str:
    """`path` itself if it names an indexed dataset, else the prefix of its tokenization.

    .jsonl/.txt files (or a directory of them) are tokenized once into `cache_dir/tokenized`, keyed
    by the files' paths, sizes and modification times and by the tokenizer's vocabulary. Rank 0
    tokenizes; the other ranks wait (collective).
    """
    prefix = _indexed_prefix(path)
    if prefix is not None:
        return prefix
    if not Path(path).exists():
        raise FileNotFoundError(f"data file {path} does not exist")
    files = user_files(path)
    key = json.dumps({
        "files": [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files],
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "text_key": text_key,
    })
    out = Path(cache_dir) / "tokenized" / f"{Path(path).stem}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"
    if parallel.is_main_process() and _indexed_prefix(out) is None:
        tokenize_to_indexed(files, tokenizer, out, text_key=text_key)
    parallel.barrier()
    return str(out)


def check_training_data(train: str | os.PathLike | None, valid: str | os.PathLike | None, tokenizer, *,
                        seq_length: int, cache_dir: str | os.PathLike | None = None, text_key: str = "text") -> None:
    """Before a run claims its output: `data.train` and `data.valid`, where set, are readable
    (an indexed pair whose .idx and .bin agree) and hold at least one sequence of `seq_length` + 1
    tokens. Text input is tokenized into the cache here, which the run then reuses (collective)."""
    cache = Path(cache_dir) if cache_dir is not None else default_data_cache()
    for key, path in (("data.train", train), ("data.valid", valid)):
        if path is None:
            continue
        tokens = indexed_token_count(indexed_prefix(path, tokenizer, cache, text_key), key)
        if tokens < seq_length + 1:
            raise UserError(f"{key}={path} holds {tokens} tokens, fewer than one sequence of train.seq_length="
                            f"{seq_length} + 1: give more text, or a shorter train.seq_length")


@dataclass
class TrainingData:
    train: Any            # map-style dataset of sample dicts, at least steps x global_batch_size long
    valid: Any | None     # held-out samples for validation (None: no validation)
    train_prefix: str | None = None
    valid_prefix: str | None = None


def gpt_training_data(train: str | os.PathLike | None, valid: str | os.PathLike | None, tokenizer, *,
                      seq_length: int, train_samples: int, valid_samples: int, seed: int,
                      cache_dir: str | os.PathLike | None = None, text_key: str = "text") -> TrainingData:
    """`GPTDataset`s of `seq_length`-token windows over `train` and `valid` (collective).

    Each may be .jsonl/.txt (a file or a directory) or an indexed-dataset prefix; both None means
    the embedded corpus's train and held-out splits. The training windows are shuffled with `seed`
    and repeat epochs as needed to fill `train_samples`.
    """
    cache = Path(cache_dir) if cache_dir is not None else default_data_cache()
    if train is None:
        if valid is not None:
            raise UserError("data.valid is set but data.train is not: set data.train= too")
        splits = ensure_corpus()
        train, valid = splits["train"], splits["heldout"]
    train_prefix = indexed_prefix(train, tokenizer, cache, text_key)
    valid_prefix = indexed_prefix(valid, tokenizer, cache, text_key) if valid is not None else None
    index_cache = cache / "gpt_dataset_cache"
    common = dict(tokenizer=tokenizer, cache_dir=index_cache, create_attention_mask=False)
    train_set = build_gpt_datasets(train_prefix, seq_length, seed, train_samples, **common)
    valid_set = None
    if valid_prefix is not None and valid_samples > 0:
        valid_set = build_gpt_datasets(valid_prefix, seq_length, seed, valid_samples, **common)
    return TrainingData(train_set, valid_set, train_prefix, valid_prefix)
