"""Tokenised corpora in megatron-core's indexed dataset format (``.bin`` + ``.idx``).

:func:`tokenize_to_indexed` turns ``.jsonl`` / ``.txt`` documents into an indexed dataset,
:func:`load_token_stream` flattens one back into a token array for evaluation, and
:func:`build_gpt_datasets` wraps one in megatron's ``GPTDataset`` for training. The
prebuilt ``helpers_cpp`` extension shipped in the megatron-core wheel provides the sample
index builder, so ``GPTDataset`` runs on CPU without compiling anything.

megatron-core is imported by the functions that use it: every stage's config module imports this
one, and a command with a bad key should fail before paying megatron's seconds of imports.
"""

from __future__ import annotations

import contextlib
import inspect
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from tqdm.auto import tqdm

from nemo_minitron.data.corpus import iter_file_texts, user_files
from nemo_minitron.errors import UserError

if TYPE_CHECKING:
    from megatron.core.datasets.gpt_dataset import GPTDataset

PathLike = str | os.PathLike[str]
Encoder = Callable[[list[str]], list[list[int]]]
# Documents per tokenizer call: large enough for HF's parallel batch encoding to pay off.
BATCH_SIZE = 256


def _accepts_keyword(function: Callable[..., Any], name: str) -> bool:
    """Whether ``function`` declares parameter ``name`` explicitly (``**kwargs`` is not enough)."""
    try:
        return name in inspect.signature(function).parameters
    except (TypeError, ValueError):
        return False


def make_encoder(tokenizer: Any) -> Encoder:
    """A batch encoder for ``tokenizer`` that never adds BOS/EOS or other special tokens.

    HF tokenizers are called on whole batches (their Rust backend encodes a batch in
    parallel); anything else falls back to ``encode`` one text at a time.
    """
    if callable(tokenizer) and _accepts_keyword(tokenizer, "add_special_tokens"):

        def encode_batch(texts: list[str]) -> list[list[int]]:
            return tokenizer(texts, add_special_tokens=False)["input_ids"]

        return encode_batch
    if _accepts_keyword(tokenizer.encode, "add_special_tokens"):
        return lambda texts: [tokenizer.encode(t, add_special_tokens=False) for t in texts]
    return lambda texts: [tokenizer.encode(t) for t in texts]


def _vocab_size(tokenizer: Any) -> int | None:
    """Number of ids the tokenizer can emit; ``len()`` counts added tokens, ``vocab_size`` not."""
    sizes = [getattr(tokenizer, "vocab_size", None)]
    with contextlib.suppress(TypeError):
        sizes.append(len(tokenizer))
    known = [s for s in sizes if isinstance(s, int)]
    return max(known) if known else None


def _eos_id(tokenizer: Any) -> int:
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise UserError("the tokenizer has no eos_token_id, which document boundaries need")
    return int(eos)


def _as_paths(paths: PathLike | Sequence[PathLike]) -> list[Path]:
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    return [file for path in paths for file in user_files(path)]


def iter_texts(paths: PathLike | Sequence[PathLike], text_key: str = "text") -> Iterator[str]:
    """Document texts of .jsonl/.txt files (or directories of them), in order."""
    for file in _as_paths(paths):
        for _, text in iter_file_texts(file, text_key):
            yield text


def _batches(items: Iterable[str], size: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _encoded_documents(
    texts: Iterable[str], tokenizer: Any, append_eos: bool, batch_size: int
) -> Iterator[list[int]]:
    encode = make_encoder(tokenizer)
    suffix = [_eos_id(tokenizer)] if append_eos else []
    for batch in _batches(texts, batch_size):
        for ids in encode(batch):
            yield list(ids) + suffix


def _remove_dataset(prefix: str) -> None:
    for suffix in (".idx", ".bin"):
        Path(prefix + suffix).unlink(missing_ok=True)


def tokenize_to_indexed(
    jsonl_or_txt_paths: PathLike | Sequence[PathLike],
    tokenizer: Any,
    output_prefix: PathLike,
    append_eos: bool = True,
    text_key: str = "text",
    batch_size: int = BATCH_SIZE,
) -> Path:
    """Tokenise documents into ``{output_prefix}.bin`` / ``.idx``; return the prefix.

    One indexed-dataset document per input document (empty ones are skipped), each
    followed by EOS when ``append_eos``. Both files are built under a temporary prefix
    and renamed into place, ``.idx`` last: an interrupted run never leaves a pair that
    megatron would load.
    """
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    prefix = str(output_prefix)
    Path(prefix).parent.mkdir(parents=True, exist_ok=True)
    dtype = DType.optimal_dtype(_vocab_size(tokenizer))
    limit = np.iinfo(dtype).max
    temp = f"{prefix}.tmp-{os.getpid()}"
    builder = IndexedDatasetBuilder(temp + ".bin", dtype=dtype)
    try:
        progress = tqdm(desc=f"tokenizing {Path(prefix).name}", unit="doc", mininterval=2.0)
        tokens = 0
        for ids in _encoded_documents(
            iter_texts(jsonl_or_txt_paths, text_key), tokenizer, append_eos, batch_size
        ):
            if not ids:
                continue
            array = np.asarray(ids, dtype=np.int64)
            if array.max() > limit or array.min() < 0:
                raise ValueError(f"token id {array.max()} does not fit the {dtype.__name__} index")
            builder.add_document(array, [array.size])
            tokens += array.size
            progress.update()
            progress.set_postfix(tokens=tokens, refresh=False)
        progress.close()
        builder.finalize(temp + ".idx")
        Path(prefix + ".idx").unlink(missing_ok=True)  # no stale index may outlive its .bin
        os.replace(temp + ".bin", prefix + ".bin")
        os.replace(temp + ".idx", prefix + ".idx")
    except BaseException:
        builder.data_file.close()
        _remove_dataset(temp)
        raise
    return Path(prefix)


def _indexed_prefix(path: PathLike) -> str | None:
    """The dataset prefix if ``path`` names an indexed dataset (by prefix, .bin or .idx)."""
    text = str(path)
    for suffix in (".bin", ".idx"):
        if text.endswith(suffix):
            text = text[: -len(suffix)]
    if Path(text + ".idx").is_file() and Path(text + ".bin").is_file():
        return text
    return None


def indexed_token_count(prefix: str, key: str) -> int:
    """The number of tokens the indexed dataset `prefix` holds, read from its .idx and checked
    against the .bin's size; a damaged pair is a UserError naming `key`, the file and the fix."""
    from megatron.core.datasets.indexed_dataset import _IndexReader

    try:
        index = _IndexReader(prefix + ".idx", multimodal=False)
        tokens = int(np.asarray(index.sequence_lengths, dtype=np.int64).sum())
        expected = tokens * index.dtype_size
    except Exception as err:  # noqa: BLE001 - megatron asserts on a bad header, numpy fails on short files
        raise UserError(f"{key}={prefix}: {prefix}.idx is not a megatron indexed-dataset index "
                        f"({type(err).__name__}: {(str(err).splitlines() or [''])[0]}); rebuild the dataset "
                        f"(preprocess_data.py) or give the .jsonl/.txt files") from None
    size = Path(prefix + ".bin").stat().st_size
    if size != expected:
        raise UserError(f"{key}={prefix}: {prefix}.bin has {size} bytes, but its .idx describes {expected} "
                        f"(a truncated or mismatched pair); rebuild the dataset or give the .jsonl/.txt files")
    return tokens


def load_token_stream(
    path_or_prefix: PathLike, tokenizer: Any = None, text_key: str = "text"
) -> np.ndarray:
    """All documents' tokens as one int64 array, every document followed by exactly one EOS.

    Accepts an indexed dataset (prefix, ``.bin`` or ``.idx``; the tokenizer then only
    supplies EOS for documents stored without one and may be ``None``) or .jsonl/.txt
    input, which is tokenised here the same way :func:`tokenize_to_indexed` would.
    """
    prefix = _indexed_prefix(path_or_prefix)
    if prefix is None:
        if tokenizer is None:
            raise ValueError(f"{path_or_prefix}: text input needs a tokenizer")
        documents: Iterable[np.ndarray] = (
            np.asarray(ids, dtype=np.int64)
            for ids in _encoded_documents(
                iter_texts(path_or_prefix, text_key), tokenizer, True, BATCH_SIZE
            )
        )
    else:
        eos = None if tokenizer is None else _eos_id(tokenizer)
        documents = (_with_eos(ids, eos) for ids in _indexed_documents(prefix))
    parts = list(documents)
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def _indexed_documents(prefix: str) -> Iterator[np.ndarray]:
    """Each document's tokens; a document may span several sequences in general."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    dataset = IndexedDataset(prefix)
    bounds = dataset.document_indices
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        parts = [dataset[i] for i in range(start, end)]
        yield np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, dtype=np.int64)


def _with_eos(ids: np.ndarray, eos: int | None) -> np.ndarray:
    if eos is None or (ids.size and ids[-1] == eos):
        return ids
    return np.append(ids, eos)


class _DatasetTokenizerInfo:
    """The slice of a tokenizer that megatron's GPTDataset reads: EOD id and vocab size.

    No ``pad`` is exposed on purpose: fixed-length windows never need padding, and
    megatron then uses -1 as the pad id, which cannot collide with a real token.
    """

    def __init__(self, tokenizer: Any) -> None:
        self.eod = _eos_id(tokenizer)
        self.vocab_size = _vocab_size(tokenizer)
        # Part of the dataset cache key: index caches are not shared across tokenizers.
        self.unique_identifiers = {
            "class": type(tokenizer).__name__,
            "eod": self.eod,
            "vocab_size": self.vocab_size,
            "name_or_path": str(getattr(tokenizer, "name_or_path", "")),
        }


def build_gpt_datasets(
    prefix: PathLike,
    seq_length: int,
    seed: int = 1234,
    num_samples: int | None = None,
    *,
    tokenizer: Any,
    cache_dir: PathLike | None = None,
    create_attention_mask: bool = True,
    eod_mask_loss: bool = False,
) -> GPTDataset:
    """Megatron's ``GPTDataset`` over the indexed dataset at ``prefix``, all of it for training.

    Samples are ``seq_length + 1``-token windows across document boundaries, shuffled with
    ``seed``; ``num_samples=None`` means one epoch, more samples repeat epochs. Items are
    dicts of ``tokens``, ``labels``, ``loss_mask``, ``position_ids`` (and ``attention_mask``
    when ``create_attention_mask``). The shuffle/sample indices are cached as .npy files in
    ``cache_dir`` (default: ``gpt_dataset_cache`` beside the dataset).
    """
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    dataset_prefix = _indexed_prefix(prefix)
    if dataset_prefix is None:
        raise FileNotFoundError(f"no indexed dataset (.bin + .idx) at {prefix}")
    cache = Path(cache_dir) if cache_dir is not None else Path(prefix).parent / "gpt_dataset_cache"
    config = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        blend=([dataset_prefix], None),
        split="1,0,0",
        path_to_cache=str(cache),
        tokenizer=_DatasetTokenizerInfo(tokenizer),
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=eod_mask_loss,
        create_attention_mask=create_attention_mask,
    )
    train, _, _ = BlendedMegatronDatasetBuilder(
        GPTDataset, [num_samples, 0, 0], lambda: True, config
    ).build()
    return train
