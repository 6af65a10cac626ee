"""A small, real instruction and preference data set built offline from the corpus.

Each example asks the model to continue a passage of a corpus document. SFT answers with the true
continuation; DPO/RPO prefers the true continuation over a corrupted one (its words shuffled, or a
passage from another document); SteerLM labels both with attribute values (true: correctness 4,
coherence 4; shuffled: correctness 1, coherence 0; another document: correctness 0, coherence 4).
Training examples come from the corpus's train split, held-out examples from its held-out split,
so alignment is measured on documents it never saw. Files use NeMo-Aligner's jsonl formats.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from nemo_minitron.errors import UserError
CONTEXT_WORDS = 32
CONTINUATION_WORDS = 12
INSTRUCTION = "Continue this passage:\n\n"
ATTRIBUTES = {"true": "correctness:4,coherence:4", "shuffled": "correctness:1,coherence:0", "other": "correctness:0,coherence:4"}
REWARDS = {"true": 4.0, "shuffled": 1.0, "other": 0.0}


def _passages(jsonl: Path, limit: int, seed: int) -> list[tuple[str, str]]:
    """(context, continuation) word windows, at most one per document, in a seeded order."""
    docs = [json.loads(line)["text"] for line in jsonl.read_text().splitlines() if line.strip()]
    random.Random(seed).shuffle(docs)
    out = []
    for text in docs:
        words = text.split()
        if len(words) < CONTEXT_WORDS + CONTINUATION_WORDS:
            continue
        out.append((" ".join(words[:CONTEXT_WORDS]), " ".join(words[CONTEXT_WORDS : CONTEXT_WORDS + CONTINUATION_WORDS])))
        if len(out) == limit:
            break
    return out


def _variants(passages: list[tuple[str, str]], seed: int) -> list[dict[str, str]]:
    rng = random.Random(seed)
    rows = []
    for i, (context, continuation) in enumerate(passages):
        words = continuation.split()
        shuffled = words[:]
        while shuffled == words:
            rng.shuffle(shuffled)
        other = passages[(i + 1 + rng.randrange(len(passages) - 1)) % len(passages)][1]
        rows.append({"context": context, "true": continuation, "shuffled": " ".join(shuffled), "other": other})
    return rows


def _write(path: Path, records: list[dict]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    tmp.replace(path)


def build_alignment_data(corpus_dir: str | Path, output_dir: str | Path, train_examples: int = 512,
                         heldout_examples: int = 64, seed: int = 0) -> dict[str, Path]:
    """Write {sft,dpo,steerlm}_{train,heldout}.jsonl; returns their paths by name."""
    corpus_dir, output_dir = Path(corpus_dir), Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, source, count in (("train", "train", train_examples), ("heldout", "heldout", heldout_examples)):
        passages = _passages(corpus_dir / f"{source}.jsonl", count, seed)
        if len(passages) < 2:
            raise UserError(f"the corpus {source} split has too few long documents for alignment examples")
        rows = _variants(passages, seed)
        rng = random.Random(seed + 1)
        sft, dpo, steer = [], [], []
        for row in rows:
            user = {"from": "User", "value": INSTRUCTION + row["context"]}
            sft.append({"system": "", "mask": "User", "conversations": [user, {"from": "Assistant", "value": row["true"]}]})
            corruption = rng.choice(["shuffled", "other"])
            prompt = [{"role": "user", "content": INSTRUCTION + row["context"]}]
            dpo.append({"prompt": prompt, "chosen_response": row["true"], "rejected_response": row[corruption],
                        "chosen_reward": REWARDS["true"], "rejected_reward": REWARDS[corruption]})
            for kind in ("true", corruption):
                steer.append({"system": "", "mask": "User", "conversations": [
                    user, {"from": "Assistant", "value": row[kind], "label": ATTRIBUTES[kind]}]})
        for name, records in (("sft", sft), ("dpo", dpo), ("steerlm", steer)):
            paths[f"{name}_{split}"] = output_dir / f"{name}_{split}.jsonl"
            _write(paths[f"{name}_{split}"], records)
    return paths
