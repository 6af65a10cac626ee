"""Alignment data: readers for NeMo-Aligner's jsonl formats and the training datasets built on them.

Accepted line formats (one JSON object per line):
- SFT, NeMo chat: {"system": str?, "conversations": [{"from": "User"|"Assistant", "value": str,
  "label": str?}, ...]}; NeMo prompt/completion: {"input": str, "output": str, "system": str?};
  OpenAI: {"messages": [{"role": ..., "content": ...}, ...]}.
- DPO / RPO (NeMo-Aligner): {"prompt": str | [turns], "chosen_response": str,
  "rejected_response": str, "chosen_reward": float?, "rejected_reward": float?}; RPO needs the rewards.
- SteerLM: the NeMo chat format with "label" on every assistant turn, e.g.
  "helpfulness:4,correctness:3"; the attributes condition the turn through a system message.
Malformed lines are reported with their line numbers and what is wrong; nothing is skipped.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nemo_minitron.align.formatting import Encoded, Turn, encode_conversation, encode_prompt_response
from nemo_minitron.data.corpus.user_data import numbered_lines
from nemo_minitron.errors import UserError

_MAX_LISTED_ERRORS = 10
_ROLE_NAMES = {"user": "user", "assistant": "assistant", "system": "system", "human": "user", "gpt": "assistant"}


class AlignDataError(UserError):
    """A data file has malformed lines; the message lists them."""


@dataclass(frozen=True)
class PreferencePair:
    prompt: str | list[Turn]
    chosen: str
    rejected: str
    chosen_reward: float | None = None
    rejected_reward: float | None = None


# --- reading -----------------------------------------------------------------------------------

def _read_lines(path: str | Path, parse) -> list[Any]:
    """`parse(obj)` each JSON line; collect every problem as 'file:line: what' and raise them all."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data={path} does not exist")
    records, errors = [], []
    for number, line in numbered_lines(path):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            if not isinstance(obj, dict):
                raise UserError(f"expected a JSON object, got {type(obj).__name__}")
            records.append(parse(obj))
        except (ValueError, KeyError, TypeError) as err:
            what = f"missing field {err}" if isinstance(err, KeyError) else str(err)
            errors.append(f"{path}:{number}: {what}")
    if errors:
        listed = "; ".join(errors[:_MAX_LISTED_ERRORS])
        more = f" (and {len(errors) - _MAX_LISTED_ERRORS} more)" if len(errors) > _MAX_LISTED_ERRORS else ""
        raise AlignDataError(f"{len(errors)} malformed line(s): {listed}{more}")
    if not records:
        raise AlignDataError(f"data={path} has no records")
    return records


def _text(value: Any, name: str) -> str:
    if not isinstance(value, str):
        raise UserError(f"field {name!r} must be a string, got {type(value).__name__}")
    return value


def _role(name: Any) -> str:
    role = _ROLE_NAMES.get(str(name).lower())
    if role is None:
        raise UserError(f"unknown speaker {name!r} (expected User/Assistant/System)")
    return role


def _turns(messages: Any, role_key: str, content_key: str) -> list[Turn]:
    if not isinstance(messages, list) or not messages:
        raise UserError("the conversation must be a non-empty list of turns")
    return [Turn(_role(m[role_key]), _text(m[content_key], content_key)) for m in messages]


def _conversation(obj: dict, steerlm: bool = False) -> list[Turn]:
    system = [Turn("system", _text(obj["system"], "system"))] if obj.get("system") else []
    if "conversations" in obj:
        turns = list(system)
        for i, message in enumerate(obj["conversations"] or []):
            role = _role(message["from"])
            if role == "assistant" and steerlm:
                label = message.get("label")
                if not label:
                    raise UserError(f"SteerLM needs a 'label' (attribute values) on assistant turn {i}")
                turns.append(Turn("system", attribute_instruction(parse_attributes(label))))
            turns.append(Turn(role, _text(message["value"], "value")))
        if len(turns) == len(system):
            raise UserError("'conversations' is empty")
    elif steerlm:
        raise UserError("SteerLM records use the NeMo chat format ('conversations' with 'label')")
    elif "messages" in obj:
        turns = system + _turns(obj["messages"], "role", "content")
    elif "input" in obj and "output" in obj:
        turns = system + [Turn("user", _text(obj["input"], "input")), Turn("assistant", _text(obj["output"], "output"))]
    else:
        raise UserError("expected 'conversations', 'messages' or 'input'/'output'")
    if not any(t.role == "assistant" for t in turns):
        raise UserError("the conversation has no assistant turn to train on")
    return turns


def parse_attributes(label: str) -> dict[str, float]:
    """'helpfulness:4,correctness:3' -> {'helpfulness': 4.0, 'correctness': 3.0}."""
    attributes = {}
    for part in label.split(","):
        name, sep, value = part.partition(":")
        if not sep or not name.strip():
            raise UserError(f"attribute {part!r} is not name:value")
        attributes[name.strip()] = float(value)
    return attributes


def attribute_instruction(attributes: dict[str, float]) -> str:
    """The system message that conditions an assistant turn on attribute values (SteerLM)."""
    values = ",".join(f"{name}:{value:g}" for name, value in attributes.items())
    return f"Respond with these attribute values: {values}"


def read_sft(path: str | Path) -> list[list[Turn]]:
    return _read_lines(path, _conversation)


def read_steerlm(path: str | Path) -> list[list[Turn]]:
    return _read_lines(path, lambda obj: _conversation(obj, steerlm=True))


def _pair(obj: dict) -> PreferencePair:
    prompt = obj["prompt"]
    if isinstance(prompt, list):
        prompt = _turns(prompt, "role" if "role" in (prompt[0] if prompt else {}) else "from",
                        "content" if "content" in (prompt[0] if prompt else {}) else "value")
    else:
        prompt = _text(prompt, "prompt")
    rewards = [obj.get("chosen_reward"), obj.get("rejected_reward")]
    for name, value in zip(("chosen_reward", "rejected_reward"), rewards):
        if value is not None and not isinstance(value, (int, float)):
            raise UserError(f"field {name!r} must be a number")
    chosen, rejected = _text(obj["chosen_response"], "chosen_response"), _text(obj["rejected_response"],
                                                                              "rejected_response")
    for name, response in (("chosen_response", chosen), ("rejected_response", rejected)):
        if not response.strip():
            raise UserError(f"field {name!r} is empty: a preference pair compares two real responses")
    return PreferencePair(prompt, chosen, rejected, *rewards)


def read_preferences(path: str | Path, need_rewards: bool = False) -> list[PreferencePair]:
    pairs = _read_lines(path, _pair)
    if need_rewards:
        missing = [i for i, p in enumerate(pairs) if p.chosen_reward is None or p.rejected_reward is None]
        if missing:
            raise AlignDataError(f"RPO needs chosen_reward and rejected_reward: record(s) {missing[:10]} lack them")
    return pairs


# --- tensors ------------------------------------------------------------------------------------

def _sample(encoded: Encoded, seq_length: int, pad_id: int) -> dict[str, torch.Tensor]:
    """Inputs, next-token labels and the loss mask of the labels, padded to seq_length."""
    ids = encoded.tokens[: seq_length + 1]
    mask = encoded.train_mask[: seq_length + 1]
    n = len(ids) - 1
    tokens = torch.full((seq_length,), pad_id, dtype=torch.long)
    labels = torch.full((seq_length,), pad_id, dtype=torch.long)
    loss_mask = torch.zeros(seq_length, dtype=torch.float32)
    tokens[:n] = torch.tensor(ids[:-1])
    labels[:n] = torch.tensor(ids[1:])
    loss_mask[:n] = torch.tensor(mask[1:], dtype=torch.float32)
    return {"tokens": tokens, "labels": labels, "loss_mask": loss_mask}


def _check_lengths(encoded: list[Encoded], seq_length: int, what: str) -> int:
    """Truncation keeps the first seq_length + 1 tokens; a record left with nothing to train on is
    an error (raising seq_length fixes it). Returns how many records were truncated."""
    empty = [i for i, e in enumerate(encoded) if not any(e.train_mask[1 : seq_length + 1])]
    if empty:
        raise UserError(
            f"{what}: record(s) {empty[:10]} have no response tokens within train.seq_length={seq_length}: "
            f"raise train.seq_length"
        )
    return sum(len(e.tokens) > seq_length + 1 for e in encoded)


class SFTDataset(torch.utils.data.Dataset):
    """Conversations as fixed-length samples: loss only on assistant tokens.

    With `pack=True`, consecutive conversations share a sample (greedily, while they fit in
    seq_length + 1 tokens) and a block-diagonal causal mask keeps each one attending only to
    itself; rotary attention depends on relative positions only, so a packed conversation scores as
    it would alone.
    """

    def __init__(self, conversations: list[list[Turn]], tokenizer, seq_length: int, pack: bool = False):
        encoded = [encode_conversation(tokenizer, turns) for turns in conversations]
        self.truncated = _check_lengths(encoded, seq_length, "SFT data")
        self.seq_length, self.pad_id = seq_length, tokenizer.eos_token_id
        encoded = [Encoded(e.tokens[: seq_length + 1], e.train_mask[: seq_length + 1]) for e in encoded]
        self.samples = _pack(encoded, seq_length + 1) if pack else [[e] for e in encoded]
        self.pack = pack

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        parts = self.samples[i]
        joined = Encoded([t for e in parts for t in e.tokens], [m for e in parts for m in e.train_mask])
        sample = _sample(joined, self.seq_length, self.pad_id)
        if self.pack:
            sample["attention_mask"] = _block_causal_mask([len(e.tokens) for e in parts], self.seq_length)
        return sample


def _pack(encoded: list[Encoded], capacity: int) -> list[list[Encoded]]:
    groups: list[list[Encoded]] = [[]]
    used = 0
    for e in encoded:
        if groups[-1] and used + len(e.tokens) > capacity:
            groups.append([])
            used = 0
        groups[-1].append(e)
        used += len(e.tokens)
    return groups


def _block_causal_mask(lengths: list[int], seq_length: int) -> torch.Tensor:
    """[1, s, s] bool, True where attention is blocked: causal within each document only.
    (The window's inputs are its first seq_length tokens, so the last document is one shorter.)"""
    doc = torch.full((seq_length,), len(lengths), dtype=torch.long)  # padding: its own block
    start = 0
    for index, n in enumerate(lengths):
        doc[start : min(start + n, seq_length)] = index
        start += n
    same_doc = doc[:, None] == doc[None, :]
    causal = torch.ones(seq_length, seq_length, dtype=torch.bool).tril()
    return ~(same_doc & causal)[None]


class PreferenceDataset(torch.utils.data.Dataset):
    """Preference pairs as consecutive samples: 2i is pair i's chosen response, 2i + 1 its rejected
    one, so every micro-batch of even size holds whole pairs."""

    def __init__(self, pairs: list[PreferencePair], tokenizer, seq_length: int):
        self.pairs = pairs
        self.encoded = [
            encode_prompt_response(tokenizer, p.prompt, response) for p in pairs for response in (p.chosen, p.rejected)
        ]
        self.truncated = _check_lengths(self.encoded, seq_length, "preference data")
        self.seq_length, self.pad_id = seq_length, tokenizer.eos_token_id

    def __len__(self) -> int:
        return len(self.encoded)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        sample = _sample(self.encoded[i], self.seq_length, self.pad_id)
        pair = self.pairs[i // 2]
        reward = pair.chosen_reward if i % 2 == 0 else pair.rejected_reward
        sample["reward"] = torch.tensor(float("nan") if reward is None else reward)
        return sample


class RepeatedDataset(torch.utils.data.Dataset):
    """`base` repeated to `length` items, each epoch in a fresh seeded order. `unit` items stay
    together (2 for preference pairs)."""

    def __init__(self, base, length: int, seed: int, unit: int = 1):
        self.base, self.length, self.unit = base, length, unit
        groups = len(base) // unit
        epochs = -(-length // len(base))
        rng = np.random.default_rng(seed)
        self.order = np.concatenate([rng.permutation(groups) for _ in range(epochs)])

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int):
        return self.base[int(self.order[i // self.unit]) * self.unit + i % self.unit]
