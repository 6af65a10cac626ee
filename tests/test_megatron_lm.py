"""Megatron-LM in and out: a save written the way Megatron-LM's pretrain_gpt.py writes one imports to
the same weights and logits (Llama, Nemotron-4, Qwen2, Qwen3, Mixtral, Qwen3-MoE, Qwen2-MoE), and so
does a hybrid (Nemotron-H) saved at TP=2 as pretrain_mamba.py saves it, whose logits are also
transformers' NemotronH's; import -> prune -> export-megatron (at TP=2) -> import is bit-exact, and
import -> export-megatron (at TP=2) -> import of the hybrid; the exported flags parse back (with
Megatron-LM's own flag definitions) to the model; what nemo-minitron cannot import is refused naming
the flag."""

from __future__ import annotations

import argparse
import dataclasses
import enum
import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from commands import last_json, minitron
from distributed import run_distributed
from nemo_minitron import checkpoint
from nemo_minitron.errors import UserError
from nemo_minitron.models import bridge, megatron_lm
from nemo_minitron.models.saved_weights import allowed_classes
from tiny import hf_model, tiny_arch, tiny_moe_arch, tiny_tokenizer, write_sentence_docs

TOKENS = torch.tensor([[5, 17, 200, 3, 64, 99, 250, 7, 12, 300, 41, 8]])


class FutureSetting(enum.Enum):
    """A setting of a newer Megatron-LM whose class the reading environment lacks (the reader runs
    in another process, where this test module is not importable)."""

    ON = "on"


def megatron_parser() -> argparse.ArgumentParser:
    """The pretrain_gpt.py and pretrain_mamba.py flags that shape a model, defined as Megatron-LM
    defines them (megatron/training/arguments.py: _add_network_size_args, _add_training_args for
    --disable-bias-linear / --add-qkv-bias, _add_distributed_args, _add_checkpointing_args,
    _add_tokenizer_args, _add_moe_args, and _add_experimental_args for a hybrid's --spec,
    --is-hybrid-model, --hybrid-*-ratio, --hybrid-override-pattern and --mamba-*): names,
    destinations, types and defaults."""
    p = argparse.ArgumentParser(allow_abbrev=False)
    for flag in ("--num-layers", "--hidden-size", "--ffn-hidden-size", "--num-attention-heads", "--kv-channels",
                 "--max-position-embeddings", "--seq-length", "--rotary-seq-len-interpolation-factor",
                 "--num-experts", "--mtp-num-layers"):
        p.add_argument(flag, type=int, default=None)
    p.add_argument("--num-query-groups", type=int, default=1)
    p.add_argument("--position-embedding-type", default="learned_absolute",
                   choices=["learned_absolute", "rope", "mrope", "relative", "none"])
    p.add_argument("--rotary-base", type=int, default=10000)
    p.add_argument("--rotary-percent", type=float, default=1.0)
    p.add_argument("--rope-scaling-factor", type=float, default=8.0)
    p.add_argument("--make-vocab-size-divisible-by", type=int, default=128)
    p.add_argument("--normalization", default="LayerNorm", choices=["LayerNorm", "RMSNorm"])
    p.add_argument("--norm-epsilon", type=float, default=1e-5)
    for flag in ("--group-query-attention", "--use-rotary-position-embeddings", "--rotary-interleaved",
                 "--use-rope-scaling", "--apply-layernorm-1p", "--squared-relu", "--swiglu", "--quick-geglu",
                 "--untie-embeddings-and-output-weights", "--add-qkv-bias", "--qk-layernorm",
                 "--multi-latent-attention", "--no-save-optim", "--no-save-rng", "--is-hybrid-model"):
        p.add_argument(flag, action="store_true")
    p.add_argument("--spec", type=str, default=None, nargs="*")
    p.add_argument("--hybrid-attention-ratio", type=float, default=0.0)
    p.add_argument("--hybrid-mlp-ratio", type=float, default=0.0)
    p.add_argument("--hybrid-override-pattern", type=str, default=None)
    p.add_argument("--mamba-state-dim", type=int, default=128)
    p.add_argument("--mamba-head-dim", type=int, default=64)
    p.add_argument("--mamba-num-groups", type=int, default=8)
    p.add_argument("--mamba-num-heads", type=int, default=None)
    p.add_argument("--disable-bias-linear", action="store_false", dest="add_bias_linear")
    for flag in ("--moe-ffn-hidden-size", "--moe-shared-expert-intermediate-size", "--moe-router-num-groups"):
        p.add_argument(flag, type=int, default=None)
    p.add_argument("--moe-router-topk", type=int, default=2)
    p.add_argument("--moe-router-topk-scaling-factor", type=float, default=None)
    p.add_argument("--moe-expert-capacity-factor", type=float, default=None)
    p.add_argument("--moe-router-score-function", default="softmax", choices=["softmax", "sigmoid"])
    p.add_argument("--moe-router-dtype", default=None, choices=["fp32", "fp64"])
    # moe_freq_type: an int N (one MoE layer every N), or a Python list expression of 0s and 1s
    p.add_argument("--moe-layer-freq", type=lambda x: int(x) if x.isdigit() else eval(x), default=1)
    for flag in ("--moe-router-pre-softmax", "--moe-shared-expert-gate", "--moe-router-enable-expert-bias",
                 "--moe-grouped-gemm"):
        p.add_argument(flag, action="store_true")
    p.add_argument("--tokenizer-type", default=None)
    p.add_argument("--tokenizer-model", default=None)
    p.add_argument("--tensor-model-parallel-size", type=int, default=1)
    p.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    p.add_argument("--ckpt-format", default="torch_dist")
    return p


def launch(flags: list[str], tokens: int) -> argparse.Namespace:
    """The args of a pretrain_gpt.py run started with `flags`, as validate_args and build_tokenizer
    leave them (kv_channels, the padded vocabulary, the dtype, the attention backend, counters)."""
    from megatron.core.transformer.enums import AttnBackend

    args = megatron_parser().parse_args(flags)
    args.kv_channels = args.kv_channels or args.hidden_size // args.num_attention_heads
    args.add_qkv_bias = args.add_qkv_bias or args.add_bias_linear
    args.padded_vocab_size = megatron_lm.padded_vocab_size(tokens, args.make_vocab_size_divisible_by,
                                                           args.tensor_model_parallel_size)
    args.params_dtype, args.attention_backend, args.future_setting = torch.float32, AttnBackend.auto, FutureSetting.ON
    return args


def llama_flags(tokenizer_dir: Path, tp: int) -> list[str]:
    """tiny_arch(tie=False) at TP=`tp` as a pretrain_gpt.py command line."""
    return ["--num-layers", "4", "--hidden-size", "64", "--ffn-hidden-size", "96", "--num-attention-heads", "4",
            "--group-query-attention", "--num-query-groups", "2", "--kv-channels", "24", "--seq-length", "128",
            "--max-position-embeddings", "256", "--position-embedding-type", "rope", "--rotary-base", "50000",
            "--normalization", "RMSNorm", "--swiglu", "--untie-embeddings-and-output-weights",
            "--disable-bias-linear", "--make-vocab-size-divisible-by", "16", "--tokenizer-type",
            "HuggingFaceTokenizer", "--tokenizer-model", str(tokenizer_dir), "--tensor-model-parallel-size", str(tp),
            "--no-save-optim"]


def save_like_megatron_lm(root: Path, arch, args: argparse.Namespace, global_sd: dict, iteration: int) -> None:
    """A model holding `global_sd` saved as Megatron-LM's save_checkpoint (which pretrain_gpt.py and
    pretrain_mamba.py share) saves it with --ckpt-format torch_dist --no-save-optim (collective),
    mirroring megatron/training/checkpointing.py (NVIDIA/Megatron-LM):
    - save_checkpoint: checkpoint_name = get_checkpoint_name(save_dir, iteration, return_base_dir=True),
      i.e. DIR/iter_{iteration:07d}, made by rank 0 (ensure_directory_exists); then
      dist_checkpointing.save(state_dict, checkpoint_name, ..., content_metadata=the cleaned metadata
      of _build_sharded_state_dict_metadata: singleton_local_shards False, chained_optim_avoid_prefix True);
    - generate_state_dict: args, checkpoint_version 3.0, iteration, model = model.sharded_state_dict(metadata)
      (the GPTModel or MambaModel unwrapped from DDP / Float16Module, so no key prefix), no optimizer or
      opt_param_scheduler under --no-save-optim, rng_state = get_rng_state's ShardedObject 'rng_state'
      over (pp, tp) (torch_dist branch; CUDA states left out on CPU); save_checkpoint adds
      num_floating_point_operations_so_far;
    - iter_finalize_fn: after every rank finished, rank 0 writes str(iteration) to
      get_checkpoint_tracker_filename(save_dir) = DIR/latest_checkpointed_iteration.txt."""
    import torch.distributed as dist
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    from nemo_minitron.models.gpt import build_gpt_model

    model = build_gpt_model(arch)
    bridge.load_global(model, global_sd)
    name = root / f"iter_{iteration:07d}"
    if dist.get_rank() == 0:
        name.mkdir(parents=True)
    dist.barrier()
    metadata = {"singleton_local_shards": False, "chained_optim_avoid_prefix": True}
    rng = [{"random_rng_state": random.getstate(), "np_rng_state": np.random.get_state(),
            "torch_rng_state": torch.get_rng_state()}]
    sharded = model.sharded_state_dict(metadata={**metadata, "dp_cp_group": ps.get_data_parallel_group(
        with_context_parallel=True)})
    if arch.is_moe:  # Megatron-LM's TE spec keeps an MoE layer's pre-MLP norm apart, under its local key
        fused = "decoder.layers.mlp.linear_fc1.layer_norm_weight"
        sharded = {name: dataclasses.replace(item, key="decoder.layers.pre_mlp_layernorm.weight")
                   if getattr(item, "key", None) == fused else item for name, item in sharded.items()}
    state_dict = {
        "args": args, "checkpoint_version": 3.0, "iteration": iteration,
        "model": sharded,
        "rng_state": ShardedObject("rng_state", rng, (ps.get_pipeline_model_parallel_world_size(),
                                                     ps.get_tensor_model_parallel_world_size()),
                                   (ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank()),
                                   replica_id=ps.get_data_parallel_rank(with_context_parallel=True)),
    }
    state_dict["num_floating_point_operations_so_far"] = 1.5e12
    dist_checkpointing.save(state_dict, str(name), content_metadata=metadata)
    dist.barrier()
    if dist.get_rank() == 0:
        (root / megatron_lm.TRACKER_FILE).write_text(str(iteration))


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict:
    """A Megatron-LM run directory with one save (iteration 7, at TP=2) of tiny_arch(tie=False) and a
    300-token tokenizer, which Megatron-LM pads to the model's 320 rows."""
    root = tmp_path_factory.mktemp("megatron_lm")
    arch = tiny_arch(tie=False)
    tiny_tokenizer(300).save_pretrained(str(root / "tokenizer"))
    global_sd = bridge.hf_to_global(arch, hf_model(arch).state_dict())
    args = launch(llama_flags(root / "tokenizer", tp=2), tokens=300)
    assert args.padded_vocab_size == arch.vocab_size
    run_distributed(save_like_megatron_lm, world_size=2, tp=2, args=(root / "run", arch, args, global_sd, 7))
    return {"root": root, "dir": root / "run", "tokenizer": root / "tokenizer", "arch": arch, "global_sd": global_sd}


@pytest.fixture(scope="module")
def teacher(run) -> Path:
    out = run["root"] / "teacher"
    minitron("import", f"megatron_path={run['dir']}", f"tokenizer={run['tokenizer']}", f"output_dir={out}")
    return out


def megatron_logits(model):
    from nemo_minitron.models.runner import forward_microbatches, gather_vocab_parallel

    return forward_microbatches(model, [{"tokens": TOKENS}], lambda logits, _: gather_vocab_parallel(logits))[0]


def weights_and_logits(path: Path, arch, global_sd: dict):
    """The weights and logits of checkpoint `path`, and the logits of a model holding `global_sd`."""
    from nemo_minitron.models.gpt import build_gpt_model

    loaded = checkpoint.load_checkpoint(path)
    source = build_gpt_model(arch)
    bridge.load_global(source, global_sd)
    return bridge.gather_global(loaded), megatron_logits(loaded), megatron_logits(source)


def assert_equal_weights(got: dict, expected: dict) -> None:
    """The same tensor names, each equal bit for bit."""
    assert got.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(got[name], tensor), name


@pytest.mark.slow
def test_import_gives_the_source_model(run, teacher):
    assert checkpoint.read_arch(teacher) == run["arch"]  # vocab 320 from the padded embedding, eos from the tokenizer
    assert checkpoint.read_metadata(teacher)["source"]["save"] == "iter_0000007"
    [(weights, logits, expected)] = run_distributed(weights_and_logits, world_size=1,
                                                    args=(teacher, run["arch"], run["global_sd"]))
    assert_equal_weights(weights, run["global_sd"])
    assert torch.equal(logits, expected)


def test_saves_are_chosen_and_mismatches_refused(run, tmp_path):
    ckpt, _ = megatron_lm.read_checkpoint(run["dir"], 7, str(run["tokenizer"]))
    assert ckpt.path.name == "iter_0000007" and not ckpt.zero_centred_gamma
    with pytest.raises(UserError, match=r"has no save iter_0000003/: choose iteration= among \['iter_0000007'\]"):
        megatron_lm.read_checkpoint(run["dir"], 3, None)
    with pytest.raises(UserError, match="has no latest_checkpointed_iteration.txt"):
        megatron_lm.read_checkpoint(run["root"], None, None)
    tiny_tokenizer(330).save_pretrained(str(tmp_path / "long"))
    tiny_tokenizer(256).save_pretrained(str(tmp_path / "short"))
    for tokenizer in ("long", "short"):  # 320 rows: 289 to 320 tokens padded to a multiple of 16 x TP 2
        with pytest.raises(UserError, match="pass the tokenizer the model was trained with"):
            megatron_lm.read_checkpoint(run["dir"], None, str(tmp_path / tokenizer))
    legacy = tmp_path / "legacy"
    (legacy / "iter_0000001" / "mp_rank_00").mkdir(parents=True)
    (legacy / megatron_lm.TRACKER_FILE).write_text("1")
    with pytest.raises(UserError, match="--ckpt-format torch checkpoint"):
        megatron_lm.read_checkpoint(legacy, None, None)


def load_export(pruned: Path, exported: Path, reimported: Path):
    """Global weights of the pruned and the re-imported checkpoint, and whether the exported save
    loads when a Transformer Engine model also asks for an `_extra_state` the export does not hold:
    under Megatron-LM's default --dist-ckpt-strictness, and under log_unexpected."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedObject
    from megatron.core.dist_checkpointing.validation import StrictHandling
    from torch.distributed.checkpoint.api import CheckpointException

    model = checkpoint.load_checkpoint(pruned)
    loads = {}
    for strict in (StrictHandling.ASSUME_OK_UNEXPECTED, StrictHandling.LOG_UNEXPECTED):
        request = {"model": model.sharded_state_dict()}
        key = "decoder.layers.self_attention.core_attention._extra_state"
        request["model"][f"{key}0"] = ShardedObject(key, None, (1,), (0,), replica_id=0)
        try:
            dist_checkpointing.load(request, str(exported / megatron_lm.RELEASE), strict=strict)
            loads[strict.value] = True
        except CheckpointException:  # "Missing key in checkpoint state_dict"
            loads[strict.value] = False
    return bridge.gather_global(model), bridge.gather_global(checkpoint.load_checkpoint(reimported)), loads


@pytest.mark.slow
def test_prune_export_import_round_trip(run, teacher, tmp_path):
    calib = write_sentence_docs(tmp_path / "calib.jsonl", 16)
    pruned, exported, reimported = tmp_path / "pruned", tmp_path / "exported", tmp_path / "reimported"
    minitron("prune", f"checkpoint={teacher}", f"output_dir={pruned}", f"calib.data={calib}", "calib.num_samples=16",
             "calib.seq_len=16", "calib.micro_batch_size=2", "loss_samples=4", "target.num_layers=2",
             "target.hidden_size=48", "target.ffn_hidden_size=64", "target.num_attention_heads=2")
    arch = checkpoint.read_arch(pruned)
    result = last_json(minitron("export-megatron", f"checkpoint={pruned}", f"output_dir={exported}", "tp=2", nproc=2))

    # Megatron-LM's layout: the tracker names a release save; args in common.pt need no class beyond
    # argparse.Namespace (Megatron-LM's weights-only loader reads them)
    assert (exported / megatron_lm.TRACKER_FILE).read_text() == "release"
    with allowed_classes([argparse.Namespace], alone=True):
        common = torch.load(exported / "release" / "common.pt", weights_only=True)
    assert (common["checkpoint_version"], common["iteration"]) == (3.0, 0)
    assert common["args"].no_save_optim and common["args"].tensor_model_parallel_size == 2

    # the flags, parsed as Megatron-LM parses them, build the pruned model at TP 1 and 2
    flags = (exported / megatron_lm.FLAGS_FILE).read_text().split()
    parsed = megatron_parser().parse_args(flags)
    assert parsed.tokenizer_model == str(exported / "tokenizer") and parsed.seq_length == 256
    assert result["make_vocab_size_divisible_by"] == parsed.make_vocab_size_divisible_by == 32
    for tp in (1, 2):
        rows = megatron_lm.padded_vocab_size(300, parsed.make_vocab_size_divisible_by, tp)
        assert megatron_lm.arch_from_args(parsed, rows).differences(arch) == []

    # re-import without tokenizer=: the recorded --tokenizer-model is the exported tokenizer/
    minitron("import", f"megatron_path={exported}", f"output_dir={reimported}")
    assert checkpoint.read_arch(reimported) == arch
    [(expected, weights, loads)] = run_distributed(load_export, world_size=1,
                                                   args=(pruned, exported, reimported))
    assert_equal_weights(weights, expected)
    assert loads == {"assume_ok_unexpected": False, "log_unexpected": True}

    from nemo_minitron.convert import ExportMegatronConfig, export_megatron

    again = export_megatron(ExportMegatronConfig(checkpoint=str(pruned), output_dir=str(exported), tp=2))
    assert again["already_complete"]


def import_zero_centred(root: Path, tokenizer_dir: Path):
    """A Nemotron-4-style run (LayerNorm with --apply-layernorm-1p, squared ReLU, half rotary, tied)
    stores gamma - 1; imported, the model holds gamma itself."""
    from nemo_minitron.models.gpt import build_gpt_model

    arch = tiny_arch(tie=True, family="nemotron")
    global_sd = bridge.hf_to_global(arch, hf_model(arch).state_dict())
    stored = {k: v - 1 if k.endswith("layernorm.weight") else v for k, v in global_sd.items()}
    flags = ["--num-layers", "4", "--hidden-size", "64", "--ffn-hidden-size", "96", "--num-attention-heads", "4",
             "--group-query-attention", "--num-query-groups", "2", "--kv-channels", "24",
             "--max-position-embeddings", "256", "--position-embedding-type", "rope", "--rotary-base", "50000",
             "--rotary-percent", "0.5", "--normalization", "LayerNorm", "--apply-layernorm-1p", "--squared-relu",
             "--disable-bias-linear", "--make-vocab-size-divisible-by", "64", "--tokenizer-type",
             "HuggingFaceTokenizer", "--tokenizer-model", str(tokenizer_dir)]
    save_like_megatron_lm(root, arch, launch(flags, tokens=300), stored, 5)
    ckpt, _ = megatron_lm.read_checkpoint(root, None, None)
    model = build_gpt_model(ckpt.arch)
    megatron_lm.load_weights(model, ckpt)
    return ckpt.arch, bridge.gather_global(model), global_sd


def test_zero_centred_norms_are_shifted(run, tmp_path):
    [(arch, weights, expected)] = run_distributed(import_zero_centred, world_size=1,
                                                  args=(tmp_path / "run", run["tokenizer"]))
    assert arch.differences(tiny_arch(tie=True, family="nemotron")) == []
    for name, tensor in expected.items():  # (gamma - 1) + 1 in fp32: at most one ulp of 1.0 off
        torch.testing.assert_close(weights[name], tensor, rtol=0, atol=2.0**-23 if "layernorm" in name else 0)


@pytest.mark.parametrize("arch", [
    tiny_arch(tie=True), tiny_arch(tie=False, rope_scaling=True), tiny_arch(tie=False, family="nemotron"),
    tiny_arch(tie=True, hidden_size=48, num_attention_heads=2, num_query_groups=1),
    tiny_arch(family="qwen2"), tiny_arch(family="qwen3"), tiny_moe_arch("mixtral"), tiny_moe_arch("qwen3_moe"),
    tiny_moe_arch("qwen2_moe"), tiny_arch(tie=False, family="nemotron_h"),
    tiny_arch(tie=True, family="nemotron_h", hybrid_pattern="MM*-M-"),
], ids=lambda arch: arch.family)
def test_args_and_flags_describe_the_model(arch, tmp_path):
    args = megatron_lm.megatron_args(arch, 300, 128, tmp_path / "tokenizer", tp=1, pp=1)
    assert megatron_lm.arch_from_args(argparse.Namespace(**args), arch.vocab_size).differences(arch) == []
    parsed = megatron_parser().parse_args(" ".join(megatron_lm.command_line_flags(args)).split())
    assert megatron_lm.arch_from_args(parsed, arch.vocab_size).differences(arch) == []
    # every flag set is written; an unset one (a dense model's MoE flags) keeps Megatron-LM's default
    assert {name: getattr(parsed, name) for name, _, _ in megatron_lm.FLAGS if args[name] is not None} == {
        name: args[name] for name, _, _ in megatron_lm.FLAGS if args[name] is not None}


# The attention extras and MoE layers of each family as pretrain_gpt.py flags, on top of llama_flags
# (whose --ffn-hidden-size 96 an MoE model leaves unused; Mixtral's ffn_hidden_size is its experts').
FAMILY_FLAGS = {
    "qwen2": (tiny_arch(tie=False, family="qwen2"), ["--add-qkv-bias"]),
    "qwen3": (tiny_arch(tie=False, family="qwen3"), ["--qk-layernorm"]),
    "mixtral": (tiny_moe_arch("mixtral"), ["--num-experts", "4", "--moe-ffn-hidden-size", "32"]),
    "qwen3_moe": (tiny_moe_arch("qwen3_moe"), ["--qk-layernorm", "--num-experts", "4", "--moe-router-topk", "2",
                                               "--moe-ffn-hidden-size", "32", "--moe-router-dtype", "fp32",
                                               "--moe-grouped-gemm", "--moe-layer-freq", "([1]*4)"]),
    "qwen2_moe": (tiny_moe_arch("qwen2_moe"), ["--add-qkv-bias", "--num-experts", "4", "--moe-ffn-hidden-size", "32",
                                               "--moe-shared-expert-intermediate-size", "48",
                                               "--moe-shared-expert-gate", "--moe-router-pre-softmax"]),
}


def import_and_export(root: Path, tokenizer_dir: Path, family: str):
    """A save of the family's tiny model written as pretrain_gpt.py writes it, imported, then exported
    as a release save and read back: (imported arch, source / imported / re-read weights, source /
    imported logits, the exported flags)."""
    from nemo_minitron.models.gpt import build_gpt_model
    from nemo_minitron.models.saved_weights import saved_shapes

    arch, extra = FAMILY_FLAGS[family]
    global_sd = bridge.hf_to_global(arch, hf_model(arch).state_dict())
    flags = [*llama_flags(tokenizer_dir, tp=1), "--make-vocab-size-divisible-by", "32", *extra]  # 320 rows at TP=1
    save_like_megatron_lm(root / "run", arch, launch(flags, 300), global_sd, 3)
    ckpt, tokenizer = megatron_lm.read_checkpoint(root / "run", None, None)
    model = build_gpt_model(ckpt.arch)
    megatron_lm.load_weights(model, ckpt)
    source = build_gpt_model(arch)
    bridge.load_global(source, global_sd)
    (root / "out" / megatron_lm.RELEASE).mkdir(parents=True)
    args = megatron_lm.megatron_args(ckpt.arch, len(tokenizer), 128, tokenizer_dir, tp=1, pp=1)
    megatron_lm.save_release(model, root / "out", args, tokenizer)
    again, _ = megatron_lm.read_checkpoint(root / "out", None, None)
    reread = build_gpt_model(again.arch)
    megatron_lm.load_weights(reread, again)
    keys = set(saved_shapes(root / "run" / "iter_0000003")) ^ set(saved_shapes(root / "out" / megatron_lm.RELEASE))
    return (ckpt.arch, again.arch, global_sd, bridge.gather_global(model), bridge.gather_global(reread),
            megatron_logits(source), megatron_logits(model), (root / "out" / megatron_lm.FLAGS_FILE).read_text(), keys)


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(FAMILY_FLAGS))
def test_qwen_and_moe_runs_import_and_export_exactly(run, tmp_path, family):
    [(arch, reread_arch, source, imported, reread, expected, logits, flags, keys)] = run_distributed(
        import_and_export, world_size=1, args=(tmp_path, run["tokenizer"], family))
    assert keys == set()  # the export holds the tensors under Megatron-LM's own keys
    assert arch.differences(FAMILY_FLAGS[family][0]) == [] and arch.family == family
    assert reread_arch == arch
    assert_equal_weights(imported, source)
    assert_equal_weights(reread, source)
    assert torch.equal(logits, expected)
    parsed = megatron_parser().parse_args(flags.split())
    assert megatron_lm.arch_from_args(parsed, arch.vocab_size).differences(arch) == []


def mamba_flags(tokenizer_dir: Path, tp: int) -> list[str]:
    """tiny_arch(tie=False, family="nemotron_h") at TP=`tp` as a pretrain_mamba.py command line: the
    layers laid out by --hybrid-override-pattern, built by megatron's Mamba stack spec."""
    return ["--num-layers", "4", "--hidden-size", "64", "--ffn-hidden-size", "96", "--num-attention-heads", "4",
            "--group-query-attention", "--num-query-groups", "2", "--kv-channels", "24", "--seq-length", "128",
            "--max-position-embeddings", "256", "--position-embedding-type", "none", "--normalization", "RMSNorm",
            "--squared-relu", "--untie-embeddings-and-output-weights", "--disable-bias-linear",
            "--spec", "megatron.core.models.mamba.mamba_layer_specs", "mamba_stack_spec",
            "--hybrid-override-pattern", "M*-M", "--mamba-num-heads", "8", "--mamba-head-dim", "12",
            "--mamba-num-groups", "2", "--mamba-state-dim", "16", "--make-vocab-size-divisible-by", "16",
            "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", str(tokenizer_dir),
            "--tensor-model-parallel-size", str(tp), "--no-save-optim"]


@pytest.fixture(scope="module")
def hybrid_run(tmp_path_factory) -> dict:
    """A pretrain_mamba.py run directory with one save (iteration 7, at TP=2) of the tiny NemotronH
    (Mamba, attention, MLP and Mamba layers, untied) and a 300-token tokenizer padded to 320 rows;
    the logits of transformers' NemotronH holding the same weights."""
    root = tmp_path_factory.mktemp("megatron_lm_hybrid")
    arch = tiny_arch(tie=False, family="nemotron_h")
    hf = hf_model(arch)
    tiny_tokenizer(300).save_pretrained(str(root / "tokenizer"))
    global_sd = bridge.hf_to_global(arch, hf.state_dict())
    args = launch(mamba_flags(root / "tokenizer", tp=2), tokens=300)
    run_distributed(save_like_megatron_lm, world_size=2, tp=2, args=(root / "run", arch, args, global_sd, 7))
    with torch.no_grad():
        hf_logits = hf(TOKENS).logits
    return {"dir": root / "run", "tokenizer": root / "tokenizer", "arch": arch, "global_sd": global_sd,
            "hf_logits": hf_logits}


@pytest.mark.slow
def test_hybrid_run_imports_and_round_trips_through_export(hybrid_run, tmp_path):
    """A pretrain_mamba.py save imports to the saved weights bit for bit, computing transformers'
    NemotronH logits; export-megatron at TP=2 records pretrain_mamba.py's args and writes its flags,
    which parse back to the model at TP 1 and 2; the export re-imports bit-exactly to the same logits."""
    arch, source = hybrid_run["arch"], hybrid_run["global_sd"]
    teacher, exported, reimported = tmp_path / "teacher", tmp_path / "exported", tmp_path / "reimported"
    minitron("import", f"megatron_path={hybrid_run['dir']}", f"tokenizer={hybrid_run['tokenizer']}",
             f"output_dir={teacher}")
    assert checkpoint.read_arch(teacher) == arch
    [(weights, logits, expected)] = run_distributed(weights_and_logits, world_size=1, args=(teacher, arch, source))
    assert_equal_weights(weights, source)
    assert torch.equal(logits, expected)
    torch.testing.assert_close(logits, hybrid_run["hf_logits"], rtol=1e-5, atol=1e-5)

    result = last_json(minitron("export-megatron", f"checkpoint={teacher}", f"output_dir={exported}", "tp=2", nproc=2))
    assert result["script"] == "pretrain_mamba.py"
    with allowed_classes([argparse.Namespace], alone=True):
        common = torch.load(exported / "release" / "common.pt", weights_only=True)
    assert common["args"].is_hybrid_model and common["args"].hybrid_override_pattern == "M*-M"
    parsed = megatron_parser().parse_args((exported / megatron_lm.FLAGS_FILE).read_text().split())
    assert parsed.spec == ["megatron.core.models.mamba.mamba_layer_specs", "mamba_stack_spec"]
    assert (parsed.position_embedding_type, parsed.mamba_num_heads, parsed.mamba_state_dim) == ("none", 8, 16)
    for tp in (1, 2):
        rows = megatron_lm.padded_vocab_size(300, parsed.make_vocab_size_divisible_by, tp)
        assert megatron_lm.arch_from_args(parsed, rows).differences(arch) == []

    minitron("import", f"megatron_path={exported}", f"output_dir={reimported}")
    assert checkpoint.read_arch(reimported) == arch
    [(again, again_logits, _)] = run_distributed(weights_and_logits, world_size=1, args=(reimported, arch, source))
    assert_equal_weights(again, source)
    assert torch.equal(again_logits, logits)


def test_hybrid_layers_from_ratios_are_megatrons_allocation():
    """Without --hybrid-override-pattern the layers are those megatron allocates from the ratios."""
    from megatron.core.ssm.mamba_hybrid_layer_allocation import allocate_layers

    flags = ["--num-layers", "8", "--hidden-size", "64", "--num-attention-heads", "4", "--ffn-hidden-size", "96",
             "--max-position-embeddings", "256", "--position-embedding-type", "none", "--normalization", "RMSNorm",
             "--squared-relu", "--disable-bias-linear", "--is-hybrid-model", "--hybrid-attention-ratio", "0.25",
             "--hybrid-mlp-ratio", "0.25", "--mamba-head-dim", "32", "--mamba-num-groups", "2"]
    arch = megatron_lm.arch_from_args(launch(flags, tokens=300), 384)
    assert arch.family == "nemotron_h" and arch.hybrid_pattern == "".join(allocate_layers(8, 0.25, 0.25))
    assert set(arch.hybrid_pattern) == {"M", "*", "-"}
    assert (arch.mamba_num_heads, arch.mamba_state_dim) == (4, 128)  # hidden x 2 / head_dim; Megatron-LM's default


LLAMA = ["--normalization", "RMSNorm", "--swiglu", "--disable-bias-linear"]
HYBRID = ["--normalization", "RMSNorm", "--squared-relu", "--disable-bias-linear", "--is-hybrid-model"]


@pytest.mark.parametrize("extra,message", [
    (["--normalization", "RMSNorm", "--swiglu"], "linear biases (train with --disable-bias-linear)"),
    ([*LLAMA, "--add-qkv-bias", "--qk-layernorm"],
     "RMSNorm + swiglu layers with --add-qkv-bias, --qk-layernorm, which no Hugging Face family has"),
    ([*LLAMA, "--num-experts", "8", "--moe-shared-expert-intermediate-size", "64", "--moe-shared-expert-gate"],
     "layers with --num-experts, --moe-shared-expert-intermediate-size, which no Hugging Face family has"),
    ([*LLAMA, "--add-qkv-bias", "--num-experts", "8", "--moe-shared-expert-intermediate-size", "64"],
     "a shared expert without its gate (add --moe-shared-expert-gate"),
    ([*LLAMA, "--num-experts", "8", "--moe-router-score-function", "sigmoid"],
     "--moe-router-score-function sigmoid (softmax only)"),
    ([*LLAMA, "--num-experts", "8", "--moe-layer-freq", "([0]+[1])"], "dense layers between the MoE layers"),
    ([*LLAMA, "--num-experts", "8", "--moe-expert-capacity-factor", "1.0"], "token dropping"),
    ([*LLAMA, "--num-experts", "8", "--moe-router-pre-softmax", "--moe-router-topk-scaling-factor", "2.5"],
     "scaled routing weights (--moe-router-topk-scaling-factor)"),
    ([*LLAMA, "--position-embedding-type", "learned_absolute"],
     "--position-embedding-type learned_absolute (rotary only)"),
    (["--normalization", "LayerNorm", "--swiglu", "--disable-bias-linear"],
     "--normalization LayerNorm with a swiglu MLP"),
    (["--normalization", "RMSNorm", "--disable-bias-linear"], "a GeLU-family MLP"),
    ([*HYBRID, "--position-embedding-type", "none", "--hybrid-override-pattern", "ME"],
     "hybrid layers ['E'] in the pattern ME (--hybrid-override-pattern; supported:"),
    (HYBRID, "--position-embedding-type rope in a hybrid model (Nemotron-H's attention has no positional embedding"),
    ([*HYBRID, "--position-embedding-type", "none", "--apply-layernorm-1p"],
     "zero-centred norms (--apply-layernorm-1p) in a hybrid model"),
    ([*LLAMA, "--position-embedding-type", "none", "--spec", "megatron.core.models.mamba.mamba_layer_specs",
      "mamba_stack_spec"], "--normalization RMSNorm with a swiglu MLP in a hybrid model"),
    ([*HYBRID, "--position-embedding-type", "none", "--hybrid-override-pattern", "M*-"],
     "megatron builds no 2-layer hybrid from hybrid_attention_ratio=0.0, hybrid_mlp_ratio=0.0, "
     "hybrid_override_pattern='M*-': The hybrid override pattern is the wrong length"),
])
def test_unsupported_models_are_refused_naming_the_flag(extra, message):
    flags = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--ffn-hidden-size", "96",
             "--max-position-embeddings", "256", "--position-embedding-type", "rope", *extra]
    with pytest.raises(UserError, match=re.escape(message)):
        megatron_lm.arch_from_args(launch(flags, tokens=300), 384)
