"""Megatron's data-parallel wrapper, optimizer and learning-rate schedule for a model on this rank.

`DistributedDataParallel` keeps gradients in contiguous fp32 buffers (`param.main_grad`) and,
through `finalize_model_grads` at the end of the forward-backward schedule, all-reduces them over
data-parallel replicas and the tied embedding between the first and last pipeline stage. Only
parameters with `requires_grad` are trained (a frozen teacher inside the module is skipped).
"""

from __future__ import annotations

import torch

from nemo_minitron.errors import UserError
from nemo_minitron.train.config import OptimConfig


def wrap_data_parallel(module):
    """Wrap `module` in megatron's DDP and register the grad hooks its schedule calls."""
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )

    config = module.config
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
    megatron's mixed-precision optimizer with fp32 main weights, which needs CUDA.
    """
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    if params_dtype != torch.float32 and not torch.cuda.is_available():
        raise UserError(
            f"dtype={str(params_dtype).removeprefix('torch.')} training needs a GPU (megatron's "
            f"mixed-precision optimizer is CUDA-only): use dtype=float32 on CPU"
        )
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
    if params_dtype == torch.float16:
        ddp_model.config.grad_scale_func = optimizer.scale_loss
    return optimizer


def build_scheduler(optimizer, cfg: OptimConfig, steps: int):
    """Linear warmup from 0 over `warmup_steps`, then `decay_style` down to `min_lr` at `steps`.

    The loop advances it before each optimizer step, so step k (1-based) uses the rate at k.
    """
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=cfg.lr,
        min_lr=cfg.min_lr,
        lr_warmup_steps=cfg.warmup_steps,
        lr_decay_steps=steps,
        lr_decay_style=cfg.decay_style,
        start_wd=cfg.weight_decay,
        end_wd=cfg.weight_decay,
        wd_incr_steps=steps,
        wd_incr_style="constant",
    )
