"""Tokenising into megatron indexed datasets, reading them back, and GPTDataset on top."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from megatron.core.datasets.gpt_dataset import GPTDataset
from megatron.core.datasets.indexed_dataset import IndexedDataset
from transformers import PreTrainedTokenizerFast

from nemo_minitron.data.indexed import build_gpt_datasets, load_token_stream, tokenize_to_indexed
from tiny import tiny_tokenizer

TEXTS = [
    "It is a truth universally acknowledged.",
    "Émile — naïve café ☕ with unicode.",
    "",  # empty documents are skipped
    "A longer document.\nWith two lines and numbers 12345.",
    *(f"document number {i}: " + "the fox " * i for i in range(40)),
]


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return tiny_tokenizer(vocab_size=400)


class CharTokenizer:
    """A complete, if trivial, tokenizer: one id per Unicode code point below 5000."""

    eos_token_id = 0

    def encode(self, text: str) -> list[int]:
        return [min(ord(c), 4999) for c in text]


@pytest.fixture
def jsonl(tmp_path: Path) -> Path:
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    return path


def _expected(tokenizer: PreTrainedTokenizerFast, eos: bool = True) -> list[list[int]]:
    suffix = [tokenizer.eos_token_id] if eos else []
    return [tokenizer.encode(t, add_special_tokens=False) + suffix for t in TEXTS if t]


def test_round_trip_token_ids(
    tmp_path: Path, jsonl: Path, tokenizer: PreTrainedTokenizerFast
) -> None:
    prefix = tokenize_to_indexed(jsonl, tokenizer, tmp_path / "out" / "docs")
    assert prefix == tmp_path / "out" / "docs"
    dataset = IndexedDataset(str(prefix))
    assert dataset.index.dtype == np.uint16  # vocab of 400 fits
    assert [dataset[i].tolist() for i in range(len(dataset))] == _expected(tokenizer)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["docs.bin", "docs.idx"]


def test_txt_input_without_eos_and_overwrite(
    tmp_path: Path, tokenizer: PreTrainedTokenizerFast
) -> None:
    txt = tmp_path / "docs.txt"
    txt.write_text("\n\n".join(t for t in TEXTS if t) + "\n")
    prefix = tmp_path / "docs"
    tokenize_to_indexed([txt], tokenizer, prefix, append_eos=False)
    tokenize_to_indexed([txt], tokenizer, prefix, append_eos=False)  # replaces the first one
    dataset = IndexedDataset(str(prefix))
    assert [dataset[i].tolist() for i in range(len(dataset))] == _expected(tokenizer, eos=False)


def test_plain_encode_tokenizer_and_token_stream(tmp_path: Path, jsonl: Path) -> None:
    chars = CharTokenizer()
    prefix = tokenize_to_indexed(jsonl, chars, tmp_path / "chars")
    stream = load_token_stream(prefix, chars)
    expected = [i for t in TEXTS if t for i in [*chars.encode(t), 0]]
    assert stream.dtype == np.int64 and stream.tolist() == expected
    assert load_token_stream(jsonl, chars).tolist() == expected
    assert load_token_stream(f"{prefix}.bin").tolist() == expected


def test_token_stream_adds_missing_eos(
    tmp_path: Path, jsonl: Path, tokenizer: PreTrainedTokenizerFast
) -> None:
    prefix = tokenize_to_indexed(jsonl, tokenizer, tmp_path / "noeos", append_eos=False)
    stream = load_token_stream(prefix, tokenizer)
    assert stream.tolist() == [i for ids in _expected(tokenizer) for i in ids]
    assert int((stream == tokenizer.eos_token_id).sum()) == sum(1 for t in TEXTS if t)
    with pytest.raises(ValueError, match="needs a tokenizer"):
        load_token_stream(jsonl)


def test_gpt_dataset_windows(
    tmp_path: Path, jsonl: Path, tokenizer: PreTrainedTokenizerFast
) -> None:
    prefix = tokenize_to_indexed(jsonl, tokenizer, tmp_path / "train")
    total = len(load_token_stream(prefix, tokenizer))
    seq = 16
    dataset = build_gpt_datasets(prefix, seq, seed=5, tokenizer=tokenizer)
    assert isinstance(dataset, GPTDataset)
    assert len(dataset) == (total - 1) // seq  # one epoch of non-overlapping windows
    sample = dataset[3]
    assert sample["tokens"].shape == (seq,) and sample["labels"].shape == (seq,)
    assert sample["attention_mask"].shape == (1, seq, seq)
    assert sample["tokens"][1:].tolist() == sample["labels"][:-1].tolist()
    assert sample["loss_mask"].sum() == seq

    def build(seed: int, cache: str) -> GPTDataset:
        return build_gpt_datasets(
            prefix,
            seq,
            seed=seed,
            num_samples=3 * len(dataset),
            tokenizer=tokenizer,
            cache_dir=tmp_path / cache,
            create_attention_mask=False,
        )

    again, fresh, reseeded = build(5, "a"), build(5, "b"), build(6, "c")
    assert len(again) >= 3 * len(dataset) and "attention_mask" not in again[0]
    windows = [again[i]["tokens"].tolist() for i in range(len(again))]
    assert windows == [fresh[i]["tokens"].tolist() for i in range(len(fresh))]
    assert windows != [reseeded[i]["tokens"].tolist() for i in range(len(reseeded))]
