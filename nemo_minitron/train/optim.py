"""Megatron's data-parallel wrapper, optimizer and learning-rate schedule for a model on this rank.

`DistributedDataParallel` keeps gradients in contiguous fp32 buffers (`param.main_grad`) and,
through `finalize_model_grads` at the end of the forward-backward schedule, all-reduces them over
data-parallel replicas and the tied embedding between the first and last pipeline stage. Only
parameters with `requires_grad` are trained (a frozen teacher inside the module is skipped).

Mixed precision, as megatron's training loop does it, for a module whose config says bf16 (or
fp16): `Float16Module` casts every weight to that dtype (megatron's local layer spec builds norms
in fp32 whatever `params_dtype`) and the activations follow; DDP accumulates and all-reduces the
gradients in fp32; `Float16OptimizerWithFloat16Params` keeps an fp32 main copy of every weight,
steps Adam and clips on those, and copies them back rounded. On CPU, `cpu_shims` lets it run.
"""

from __future__ import annotations

import torch

from nemo_minitron.train.config import OptimConfig


def wrap_data_parallel(module):
    """Wrap `module` in megatron's `Float16Module` when its config says bf16/fp16 (in place: the
    module's weights are cast), then in DDP, and register the grad hooks its schedule calls."""
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )
    from megatron.core.transformer.module import Float16Module

    config = module.config
    if config.bf16 or config.fp16:
        module = Float16Module(config, module)
    ddp = DistributedDataParallel(
        config,
        # fp32 gradient accumulation across micro-batches whatever the parameter dtype; one
        # synchronous all-reduce after the last micro-batch (no bucketing or overlap).
        DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False),
        module,
    )
    # The schedule reads these from the model config: sync grads once per global batch.
    config.no_sync_func = ddp.no_sync
    config.finalize_model_grads_func = finalize_model_grads
    return ddp


def build_optimizer(ddp_model, cfg: OptimConfig, params_dtype: torch.dtype):
    """Megatron's Adam (torch's AdamW without TE/apex) with global-norm gradient clipping.

    Norms and 1-D parameters get no weight decay (megatron's default grouping). bf16/fp16 use
    megatron's mixed-precision optimizer with fp32 main weights (bf16 without loss scaling, fp16
    with its dynamic loss scale).
    """
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    config = OptimizerConfig(
        optimizer="adam",
        lr=cfg.lr,
        min_lr=cfg.min_lr,
        weight_decay=cfg.weight_decay,
        adam_beta1=cfg.adam_beta1,
        adam_beta2=cfg.adam_beta2,
        adam_eps=cfg.adam_eps,
        clip_grad=cfg.clip_grad,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        params_dtype=params_dtype,
        use_distributed_optimizer=False,
    )
    optimizer = get_megatron_optimizer(config, [ddp_model])
    _use_fused_torch_adam(optimizer)
    if params_dtype == torch.float16:
        ddp_model.config.grad_scale_func = optimizer.scale_loss
    return optimizer


def _use_fused_torch_adam(optimizer) -> None:
    """Where megatron falls back to torch's Adam (neither Transformer Engine nor apex installed, as
    on CPU) it builds it with torch's defaults, which on CPU update one tensor at a time; switch it
    to torch's fused kernel, the same update in one pass over each tensor (0.17 s -> 0.05 s a step
    for a SmolLM2-sized student on 2 CPU cores: docs/benchmarks.md). TE's and apex's Adam are fused
    already."""
    for inner in optimizer.chained_optimizers:
        if isinstance(inner.optimizer, (torch.optim.Adam, torch.optim.AdamW)):
            for group in inner.optimizer.param_groups:
                group["fused"] = True


def build_scheduler(optimizer, cfg: OptimConfig, steps: int):
    """Linear warmup from 0 over `cfg.warmup_for(steps)`, then `decay_style` down to `min_lr` at `steps`.

    The loop advances it before each optimizer step, so step k (1-based) uses the rate at k.
    """
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=cfg.lr,
        min_lr=cfg.min_lr,
        lr_warmup_steps=cfg.warmup_for(steps),
        lr_decay_steps=steps,
        lr_decay_style=cfg.decay_style,
        start_wd=cfg.weight_decay,
        end_wd=cfg.weight_decay,
        wd_incr_steps=steps,
        wd_incr_style="constant",
    )
