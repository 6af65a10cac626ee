"""Tiny real models and tokenizers made on the spot, so no test needs a hub."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

SENTENCES = [
    "It is a truth universally acknowledged, that a single man in possession",
    "of a good fortune, must be in want of a wife.",
    "The quick brown fox jumps over the lazy dog.",
    "Pruning and distillation make small models from large ones.",
]


def tiny_tokenizer(vocab_size: int = 320) -> transformers.PreTrainedTokenizerFast:
    """A GPT-2-style byte-level BPE trained here (256 byte tokens + merges + EOS)."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train_from_iterator(SENTENCES * 5, trainer)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>")


def tiny_arch(tie: bool = True, rope_scaling: bool = False, family: str = "llama", **changes):
    from nemo_minitron.models.config import ModelArch
    from nemo_minitron.models.families import FAMILIES, family_attention

    # head_dim (24) differs from hidden/heads (16) on purpose; GQA with 2 groups of 2 heads.
    # Nemotron: the family brings LayerNorm + squared ReLU; rotary on half of each head as Nemotron-4.
    # Qwen2 / Qwen3: the family brings QKV biases / per-head query and key norms.
    # Nemotron-H (hybrid): Mamba, attention, MLP, Mamba layers; Mamba mixers of 8 heads of 12
    # channels in 2 groups (4 heads each) with 16 states; no rotary.
    if FAMILIES[family].hybrid:
        hybrid = dict(hybrid_pattern="M*-M", mamba_num_heads=8, mamba_head_dim=12, mamba_num_groups=2,
                      mamba_state_dim=16, rope_theta=10000.0)
        changes = hybrid | {"num_layers": len(changes.get("hybrid_pattern", hybrid["hybrid_pattern"]))} | changes
    fields = dict(
        num_layers=4, hidden_size=64, ffn_hidden_size=96, num_attention_heads=4, num_query_groups=2,
        kv_channels=24, vocab_size=320, max_position_embeddings=256, rope_theta=50000.0,
        rope_scaling_factor=8.0 if rope_scaling else None, norm_eps=1e-5, tie_embeddings=tie, family=family,
        eos_token_id=0, rotary_percent=FAMILIES[family].hf_rotary_percent, **family_attention(family),
    )
    return ModelArch(**fields | changes)


def tiny_moe_arch(family: str = "qwen3_moe", tie: bool = False, **changes):
    """`tiny_arch` with mixture-of-experts layers: 4 routed experts of 32, top-2 (Qwen2-MoE: plus a
    shared expert of 48, weights from the softmax over all experts)."""
    moe = dict(num_moe_experts=4, moe_router_topk=2, moe_ffn_hidden_size=32)
    if family == "qwen2_moe":
        moe |= dict(moe_shared_expert_intermediate_size=48, moe_router_pre_softmax=True)
    if family == "mixtral":
        moe |= dict(ffn_hidden_size=32)  # Mixtral's one intermediate_size is the experts'
    return tiny_arch(tie=tie, family=family, **moe | changes)


def hf_model(arch, seed: int = 0) -> transformers.PreTrainedModel:
    from nemo_minitron.models.hf_config import to_hf

    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(to_hf(arch), dtype=torch.float32)
    with torch.no_grad():  # norms start as ones, biases as zeros; perturb them so a mix-up would show
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("proj.bias"):
                p.add_(torch.randn_like(p) * 0.1)
            if name.endswith("gate.weight"):  # routers: decisive top-k choices, no near-ties to flip
                p.normal_(0, 1)
            if name.endswith(("mixer.A_log", "mixer.D", "mixer.dt_bias")):  # Mamba: one value per head
                p.add_(torch.randn_like(p) * 0.3)
    return model.eval()


def write_hf_dir(path: Path, arch, seed: int = 0) -> transformers.PreTrainedModel:
    model = hf_model(arch, seed)
    model.save_pretrained(str(path))
    tiny_tokenizer(arch.vocab_size).save_pretrained(str(path))
    return model


def write_sentence_docs(path: Path, count: int) -> Path:
    """A jsonl file of `count` documents, each a rotation of SENTENCES repeated three times."""
    docs = [" ".join(SENTENCES[i % 4 :] + SENTENCES[: i % 4]) * 3 for i in range(count)]
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return path


def user_corpus(path: Path, count: int = 120) -> list[str]:
    """Pipeline overrides for a corpus of the user's file alone: `count` sentence documents written
    to `path`, a fifth of them held out and a fifth for calibration."""
    docs = write_sentence_docs(path, count)
    return ["corpus.sources=[]", f"corpus.user_paths=[{docs}]", "corpus.heldout_fraction=0.2",
            "corpus.calib_fraction=0.2"]


def short_correction(seq_length: int) -> list[str]:
    """Pipeline overrides for a teacher correction (a default stage) of one step of `seq_length`
    tokens, so a pipeline test on a tiny model and corpus runs every default stage."""
    return ["teacher_correct.train.steps=1", f"teacher_correct.train.seq_length={seq_length}",
            "teacher_correct.optim.warmup_steps=0"]


def global_weights(*paths: str | Path) -> list[dict[str, torch.Tensor]]:
    """The weights of our checkpoints at `paths` in the global (TP=1 x PP=1) layout, gathered over
    this process's model-parallel group: call it where megatron's parallel state is up (inside
    `run_distributed`, or after `parallel.initialize()`)."""
    from nemo_minitron import checkpoint
    from nemo_minitron.models import bridge

    return [bridge.gather_global(checkpoint.load_checkpoint(path)) for path in paths]


def keep_layers(global_sd: dict[str, torch.Tensor], keep: list[int]) -> dict[str, torch.Tensor]:
    """A depth prune in the global layout: the layers in `keep`, renumbered 0..len(keep)-1."""
    kept = {}
    for name, tensor in global_sd.items():
        parts = name.split(".")
        if name.startswith("decoder.layers."):
            if int(parts[2]) in keep:
                kept[".".join(["decoder", "layers", str(keep.index(int(parts[2]))), *parts[3:]])] = tensor
        else:
            kept[name] = tensor
    return kept


def reference_perplexity(hf_dir: Path, text_file: Path, seq_len: int, max_windows: int | None = None) -> float:
    """Independent reference: transformers' model, tokenizer and loss on the same windows (with
    `max_windows`, that many of the N windows, the i-th starting at window floor(i N / n))."""
    tok = transformers.AutoTokenizer.from_pretrained(str(hf_dir))
    model = transformers.AutoModelForCausalLM.from_pretrained(str(hf_dir)).eval()
    stream = []
    for line in text_file.read_text().splitlines():
        stream += tok(json.loads(line)["text"], add_special_tokens=False).input_ids + [tok.eos_token_id]
    available = (len(stream) - 1) // seq_len
    n = min(available, max_windows or available)
    total = 0.0
    with torch.no_grad():
        for i in range(n):
            start = (i * available // n) * seq_len
            window = torch.tensor([stream[start : start + seq_len + 1]])
            logits = model(window[:, :-1]).logits
            total += torch.nn.functional.cross_entropy(logits[0], window[0, 1:], reduction="sum").item()
    return math.exp(total / (n * seq_len))
