"""NeMo 2's own conversions, run by NeMo itself (nemo_toolkit 2.7.3 in the venv scripts/test.sh
makes), as the independent side of tests/test_nemo2.py. From nemo_minitron it takes only what stands
in for CUDA: the RNG tracker and a hybrid's GPU libraries (the points below).

    python tests/nemo_driver.py import-hf HF_DIR NEMO_DIR [HF_DIR NEMO_DIR ...]   # llm.import_ckpt: HF -> NeMo 2
    python tests/nemo_driver.py export-hf NEMO_DIR HF_DIR [NEMO_DIR HF_DIR ...]   # llm.export_ckpt: NeMo 2 -> HF
    python tests/nemo_driver.py restore NEMO_DIR OUT_DIR [NEMO_DIR OUT_DIR ...]   # NeMo restores, computes, saves

`restore` is the part of `llm.export_ckpt` before any Hugging Face class: the exporter NeMo registers
for the context's model class restores NEMO_DIR (`nemo_load`: the context, the model NeMo builds
from it, weights/ loaded by NeMo's strategy); the model's logits for token ids it draws go to
OUT_DIR/logits.pt, and NeMo saves the model again as `llm.import_ckpt` saves (`nemo_save`) into
OUT_DIR/nemo. (NeMo's NemotronH exporter and importer take their config from the Hub by model size,
and transformers 4.57 has no NemotronH: a tiny hybrid goes no further.)

Several pairs convert in one process, which pays NeMo's start-up once.

What NeMo needs on a CPU without Transformer Engine or CUDA, and nothing more:
- no-op `torch.cuda.synchronize / current_device / Stream` and NeMo's `_fix_tensors_device` (its
  strategy and checkpoint loader call them unconditionally); a seeded model-parallel RNG state in
  megatron's RNG tracker, kept by nemo_minitron's CPU tracker (NeMo seeds megatron's CUDA one only
  where there are CUDA devices, and megatron's Mamba mixer builds its parameters under it);
- `apply_rope_fusion=False`, `persist_layer_norm=False` (fused kernels that need TE / apex);
- synchronous checkpoint saves;
- the local-spec names of the per-layer norms. NeMo's HF<->NeMo mappings name the norms as
  Transformer Engine's fused layers do (`self_attention.linear_qkv.layer_norm_weight`,
  `mlp.linear_fc1.layer_norm_weight`); without TE NeMo builds megatron-core's local spec, whose
  in-memory modules are `input_layernorm` / `pre_mlp_layernorm`, so NeMo's own mapping matches no
  norm and leaves them at their initial 1.0 with no error. Both directions are given the local names
  instead (`_local_norm_names`), which is what NeMo does on a GPU node with TE. On disk both specs
  write the fused names (megatron-core's `sharded_state_dict_keys_map`);
- experts one MLP each. NeMo's Qwen3-MoE config asks for grouped GEMM and fused token permutation
  (TE kernels); without them megatron-core builds its `SequentialMLP`, whose experts are
  `experts.local_experts.E.linear_fc1.weight` in memory where the grouped layer holds
  `experts.linear_fc1.weightE`, the names NeMo's Qwen3 mapping uses. Both directions are given the
  sequential names (`_sequential_expert_names`); on disk the two layouts are the same (megatron-core
  keeps them interchangeable), and NeMo's Mixtral mapping uses the sequential names already;
- the TE spec's checkpoint key of an MoE layer's pre-MLP norm. TE fuses a dense layer's pre-MLP
  norm into linear_fc1 but keeps an MoE layer's as a module of its own, saved as
  `pre_mlp_layernorm.weight`; the local spec maps it to the fused key. The local spec NeMo builds
  here is made to save and load the TE key (`_te_moe_norm_key`), as NeMo on a GPU node does;
- a hybrid's layers. NeMo's SSM configs build megatron's Mamba stack on its TE spec, whose mixer
  runs mamba_ssm's CUDA kernels; neither exists here. The stack gets the same layers on
  megatron-core's local modules, saving under the TE spec's keys (nemo_minitron's
  `gpt.hybrid_stack_spec(use_te=False)`), and the mixer the torch kernels
  (`models/mamba_kernels.py`, checked against transformers' NemotronH in test_hybrid.py). NeMo's
  context, config, strategy, loading and saving are NeMo's own.
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
LOCAL_NORMS = {  # NeMo's (TE) name -> megatron-core local spec's in-memory name
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "self_attention.linear_qkv.layer_norm_bias": "input_layernorm.bias",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
    "mlp.linear_fc1.layer_norm_bias": "pre_mlp_layernorm.bias",
}


def _cpu_shims() -> None:
    torch.cuda.synchronize = lambda *a, **k: None
    torch.cuda.current_device = lambda: "cpu"

    class Stream:  # noqa: D401 - a stand-in with the interface NeMo touches
        def __init__(self, *a, **k):
            pass

        def wait_stream(self, *a, **k):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *a):
            return False

    torch.cuda.Stream = Stream
    torch.cuda.stream = lambda *a, **k: Stream()
    sys.path.insert(0, str(REPO))  # this checkout's nemo_minitron, wherever the venv installed it from
    from nemo_minitron.models import mamba_kernels

    mamba_kernels.install()  # before megatron's Mamba modules are imported
    from megatron.core.tensor_parallel import random as megatron_random

    from nemo_minitron.cpu_shims import CpuRNGStatesTracker

    tracker = CpuRNGStatesTracker()
    tracker.add("model-parallel-rng", 1234)
    megatron_random._CUDA_RNG_STATE_TRACKER, megatron_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = tracker, True


GROUPED_EXPERTS = {  # NeMo's grouped-GEMM expert name pattern -> megatron-core SequentialMLP's
    "mlp.experts.linear_fc1.weight*": "mlp.experts.local_experts.*.linear_fc1.weight",
    "mlp.experts.linear_fc2.weight*": "mlp.experts.local_experts.*.linear_fc2.weight",
}
# HF model_type -> the NeMo model class whose importer reads it
IMPORTERS = {"qwen2": "Qwen2Model", "qwen3": "Qwen3Model", "qwen3_moe": "Qwen3Model", "mixtral": "MixtralModel"}


def _sequential_expert_names(pattern):
    """A mapping or transform key pattern (or a tuple of them) with grouped expert names made sequential."""
    if isinstance(pattern, tuple):
        return tuple(_sequential_expert_names(p) for p in pattern)
    for grouped, sequential in GROUPED_EXPERTS.items():
        if pattern.endswith(grouped):
            return pattern[: -len(grouped)] + sequential
    return pattern


def _local_norm_names(mapping: dict[str, str], nemo_keys: set[str], nemo_is_source: bool) -> dict[str, str]:
    """`mapping` with each fused norm name on NeMo's side replaced by the local spec's name where
    NeMo's model (`nemo_keys`) holds the local one."""
    renamed = {}
    for src, dst in mapping.items():
        nemo = src if nemo_is_source else dst
        for fused, local in LOCAL_NORMS.items():
            if nemo.endswith(fused) and not any(k.endswith(fused) for k in nemo_keys):
                nemo = nemo[: -len(fused)] + local
        renamed.update({nemo: dst} if nemo_is_source else {src: nemo})
    return renamed


def _te_moe_norm_key() -> None:
    from megatron.core.models.gpt import gpt_layer_specs

    local_spec = gpt_layer_specs.get_gpt_layer_local_spec

    @functools.wraps(local_spec)
    def get_gpt_layer_local_spec(*args, **kwargs):
        spec = local_spec(*args, **kwargs)
        if kwargs.get("num_experts"):
            keys = spec.submodules.sharded_state_dict_keys_map
            spec.submodules.sharded_state_dict_keys_map = {k: v for k, v in keys.items() if k != "pre_mlp_layernorm."}
        return spec

    gpt_layer_specs.get_gpt_layer_local_spec = get_gpt_layer_local_spec


def _patch_nemo() -> None:
    from nemo.collections.llm.gpt.model import llama, mixtral, qwen2, qwen3, ssm
    from nemo.lightning import MegatronStrategy, io
    from nemo.lightning.io import pl

    from nemo_minitron.models.gpt import hybrid_stack_spec

    original = io.apply_transforms

    def apply_transforms(source, target, mapping, transforms=None, **kwargs):
        source_keys = set(source.state_dict())
        nemo_is_source = any(".decoder." in f".{k}" for k in source_keys)
        nemo_keys = source_keys if nemo_is_source else set(target.state_dict())
        mapping = {_sequential_expert_names(k): _sequential_expert_names(v) for k, v in mapping.items()}
        for transform in transforms or []:
            transform.source_key = _sequential_expert_names(transform.source_key)
            transform.target_key = _sequential_expert_names(transform.target_key)
        return original(source, target, mapping=_local_norm_names(mapping, nemo_keys, nemo_is_source),
                        transforms=transforms or [], **kwargs)

    io.apply_transforms = apply_transforms  # the module every model's connector calls it through
    pl._fix_tensors_device = lambda checkpoint: checkpoint  # moves tensors between CUDA devices
    # the classes the importers and the contexts this project writes build (dataclasses: each its own __init__)
    for config_class in (llama.LlamaConfig, llama.Llama31Config, qwen2.Qwen2Config, qwen3.Qwen3Config,
                         mixtral.MixtralConfig, mixtral.MixtralConfig8x7B, mixtral.MixtralConfig8x22B):
        _with_defaults(config_class, apply_rope_fusion=False, persist_layer_norm=False)
    _with_defaults(qwen3.Qwen3MoEConfig, apply_rope_fusion=False, persist_layer_norm=False, moe_grouped_gemm=False,
                   moe_permute_fusion=False)
    _with_defaults(MegatronStrategy, ckpt_async_save=False)
    _te_moe_norm_key()
    ssm.default_mamba_stack_spec = hybrid_stack_spec(use_te=False)  # what SSMConfig's mamba_stack_spec defaults to


def _with_defaults(cls, **defaults) -> None:
    """Make `cls` default to `defaults` where a caller does not set them (NeMo's config refuses the
    fused kernels where TE is missing; its async saves synchronise through CUDA). The context NeMo
    saves records them as set."""
    init = cls.__init__

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        init(self, *args, **{**defaults, **kwargs})

    cls.__init__ = __init__


def import_hf(hf_dir: str, nemo_dir: str) -> None:
    from nemo.collections import llm

    # Only the model's class chooses the importer; the importer builds the config from config.json.
    model_type = json.loads((Path(hf_dir) / "config.json").read_text())["model_type"]
    model_class = getattr(llm, IMPORTERS.get(model_type, "LlamaModel"))
    model = model_class(llm.GPTConfig(num_layers=1, hidden_size=64, num_attention_heads=1))
    llm.import_ckpt(model=model, source=f"hf://{hf_dir}", output_path=Path(nemo_dir))


def export_hf(nemo_dir: str, hf_dir: str) -> None:
    from nemo.collections import llm

    llm.export_ckpt(path=Path(nemo_dir), target="hf", output_path=Path(hf_dir))


@torch.no_grad()
def restore(nemo_dir: str, out_dir: str) -> None:
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.mamba import MambaModel
    from nemo.lightning.io.api import load_connector_from_trainer_ckpt

    exporter = load_connector_from_trainer_ckpt(Path(nemo_dir), "hf")  # what llm.export_ckpt asks first
    model, trainer = exporter.nemo_load(Path(nemo_dir))
    module = model.module
    while not isinstance(module, (GPTModel, MambaModel)):
        module = module.module
    tokens = torch.randint(0, module.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(tokens.shape[1]).expand_as(tokens)
    causal = torch.triu(torch.ones(tokens.shape[1], tokens.shape[1], dtype=torch.bool), diagonal=1)[None, None]
    logits = module.eval()(input_ids=tokens, position_ids=positions, attention_mask=causal)
    Path(out_dir).mkdir(parents=True)
    torch.save({"tokens": tokens, "logits": logits}, Path(out_dir) / "logits.pt")
    exporter.nemo_save(Path(out_dir) / "nemo", trainer)


if __name__ == "__main__":
    command, *paths = sys.argv[1:]
    _cpu_shims()
    _patch_nemo()
    for source, output in zip(paths[::2], paths[1::2], strict=True):
        {"import-hf": import_hf, "export-hf": export_hf, "restore": restore}[command](source, output)
