"""What a hybrid (Mamba) model costs on this CPU, where its Mamba kernels are torch functions
(`models/mamba_kernels.py`), one process:

1. the chunked selective scan against the step-by-step recurrence it equals, forward only, for a
   Mamba layer of Nemotron-H's head shape (heads of 64 channels, 128 states, 8 groups) at 1024
   tokens: the chunk size megatron's mixer uses (128) and two others;
2. a training step (forward + backward) of one hybrid model against a transformer of the same
   parameter count, width and depth, in fp32 and bf16: each layer of the hybrid is a Mamba, an
   attention or an MLP layer (pattern "M-M*-M-M-"), each of the transformer attention + SwiGLU MLP.

    .venv/bin/python benchmarks/hybrid.py [--seq-len 1024] [--repeats 3]

Prints a Markdown section for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import platform

import torch
import torch.nn.functional as F

from integrity import best_of  # benchmarks/integrity.py: the best of a few timed runs
from nemo_minitron import parallel
from nemo_minitron.models.config import ModelArch
from nemo_minitron.models.gpt import build_gpt_model, causal_attention_mask, position_ids_for
from nemo_minitron.models.mamba_kernels import ssd_scan


def recurrence(x, dt, A, B, C):
    heads = x.shape[2]
    B, C = B.repeat_interleave(heads // B.shape[2], 2), C.repeat_interleave(heads // C.shape[2], 2)
    state = torch.zeros(x.shape[0], heads, x.shape[3], B.shape[3])
    out = []
    for t in range(x.shape[1]):
        step = dt[:, t, :, None, None]
        state = torch.exp(step * A[:, None, None]) * state + step * x[:, t, :, :, None] * B[:, t, :, None, :]
        out.append(torch.einsum("bhpn,bhn->bhp", state, C[:, t]))
    return torch.stack(out, 1)


def scan_section(seq_len: int, repeats: int) -> list[str]:
    g = torch.Generator().manual_seed(0)
    b, heads, p, groups, n = 1, 32, 64, 8, 128
    x, dt = torch.randn(b, seq_len, heads, p, generator=g), F.softplus(torch.randn(b, seq_len, heads, generator=g))
    B, C = torch.randn(b, seq_len, groups, n, generator=g), torch.randn(b, seq_len, groups, n, generator=g)
    A = -torch.rand(heads, generator=g)
    with torch.no_grad():
        step_by_step = best_of(repeats, lambda: recurrence(x, dt, A, B, C))
        rows = [f"| recurrence, one token at a time | {step_by_step:.3f} | 1.00 |"]
        for chunk in (64, 128, 256):
            seconds = best_of(repeats, lambda: ssd_scan(x, dt, A, B, C, chunk))
            rows.append(f"| chunked scan, chunk {chunk} | {seconds:.3f} | {step_by_step / seconds:.1f} |")
    return [f"Scan of {heads} heads x {p} channels, {groups} groups x {n} states, {seq_len} tokens, fp32 "
            f"(seconds, best of {repeats}):", "", "| computation | s | speed-up |", "| --- | ---: | ---: |", *rows]


def step_seconds(arch: ModelArch, dtype: torch.dtype, seq_len: int, repeats: int) -> float:
    model = build_gpt_model(arch, params_dtype=dtype)
    tokens = torch.randint(0, arch.vocab_size, (1, seq_len), generator=torch.Generator().manual_seed(1))

    def step():
        logits = model(tokens, position_ids_for(tokens), causal_attention_mask(seq_len))
        logits.float().logsumexp(-1).mean().backward()

    step()  # warm-up
    return best_of(repeats, step)


def model_section(seq_len: int, repeats: int) -> list[str]:
    common = dict(hidden_size=512, num_attention_heads=8, num_query_groups=2, kv_channels=64, vocab_size=4096,
                  max_position_embeddings=4096, norm_eps=1e-5, tie_embeddings=True)
    hybrid = ModelArch(num_layers=9, ffn_hidden_size=2048, family="nemotron_h", hybrid_pattern="M-M*-M-M-",
                       mamba_num_heads=16, mamba_head_dim=64, mamba_num_groups=8, mamba_state_dim=128, **common)
    # a Llama of the same hidden size with as many parameters, over ~as many layers
    target = hybrid.num_parameters()["total"]
    llama = min((ModelArch(num_layers=layers, ffn_hidden_size=ffn, family="llama", **common)
                 for layers in range(2, 10) for ffn in range(256, 4097, 128)),
                key=lambda a: (abs(a.num_parameters()["total"] - target), abs(a.num_layers - 5)))
    rows = []
    for name, arch in (("hybrid M-M*-M-M-", hybrid), (f"llama {llama.num_layers} layers, FFN {llama.ffn_hidden_size}", llama)):
        times = [step_seconds(arch, dtype, seq_len, repeats) for dtype in (torch.float32, torch.bfloat16)]
        rows.append(f"| {name} | {arch.num_parameters()['total'] / 1e6:.1f}M | {times[0]:.3f} | {times[1]:.3f} |")
    return [f"Training step (forward + backward), 1 x {seq_len} tokens, seconds (best of {repeats}):", "",
            "| model | parameters | fp32 | bf16 |", "| --- | ---: | ---: | ---: |", *rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    parallel.initialize()
    flags = open("/proc/cpuinfo").read() if platform.system() == "Linux" else ""
    kind = "AVX512-BF16" if "avx512_bf16" in flags else "AVX2 (bf16 emulated)"
    print(f"### Hybrid models on CPU (issue 27)\n\n`.venv/bin/python benchmarks/hybrid.py --seq-len {args.seq_len}` "
          f"({platform.machine()}, {torch.get_num_threads()} threads, {kind}).\n")
    print("\n".join(scan_section(args.seq_len, args.repeats)) + "\n")
    print("\n".join(model_section(args.seq_len, args.repeats)))


if __name__ == "__main__":
    main()
