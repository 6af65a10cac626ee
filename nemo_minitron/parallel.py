"""torch.distributed and megatron `parallel_state` for any TP x PP x DP, on CPU (gloo) or GPU (nccl).

Every stage calls `initialize(tp, pp)` once. Mixture-of-experts models may also split their experts
over `ep` expert-parallel ranks, carved out of the data-parallel ones (megatron's expert grid: each
expert is split over expert-TP = TP ranks; tp * ep * pp must divide the world). Under `torchrun`/`srun` the world comes from the
environment; a plain `python` process becomes a world of one, so the same code runs on a laptop.
"""

from __future__ import annotations

import os
import random
import sys
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

from nemo_minitron.cpu_shims import apply_cpu_shims
from nemo_minitron.errors import UserError
from nemo_minitron.writer_processes import check_not_importing_main


@dataclass(frozen=True)
class ParallelLayout:
    """Where this process sits in the TP x PP x DP grid."""

    world_size: int
    rank: int
    tp: int
    pp: int
    dp: int
    tp_rank: int
    pp_rank: int
    dp_rank: int
    ep: int = 1

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    def describe(self) -> str:
        return f"world={self.world_size} tp={self.tp} pp={self.pp} dp={self.dp}" + (f" ep={self.ep}" if self.ep > 1 else "")


def device() -> torch.device:
    """The device this process computes on."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def launch_rank() -> int:
    """This process's global rank as its launcher set it (torchrun's RANK, srun's SLURM_PROCID),
    readable before torch.distributed starts."""
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))


def _slurm_to_torch_env() -> None:
    """Under `srun` without torchrun, derive torch's rendezvous variables from Slurm's."""
    if "RANK" in os.environ or "SLURM_PROCID" not in os.environ:
        return
    os.environ["RANK"] = os.environ["SLURM_PROCID"]
    os.environ["WORLD_SIZE"] = os.environ["SLURM_NTASKS"]
    os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")
    if "MASTER_ADDR" not in os.environ:
        os.environ["MASTER_ADDR"] = _first_slurm_host()
    os.environ.setdefault("MASTER_PORT", "29500")


def _first_slurm_host() -> str:
    if os.environ.get("SLURM_NNODES", "1") == "1":
        return "127.0.0.1"
    import shutil
    import subprocess

    nodelist = os.environ.get("SLURM_JOB_NODELIST", "")
    if shutil.which("scontrol") and nodelist:
        hosts = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True).stdout.split()
        if hosts:
            return hosts[0]
    raise UserError("multi-node srun without MASTER_ADDR: export MASTER_ADDR (the first node's hostname) in the job script")


def initialize(tp: int = 1, pp: int = 1, seed: int = 1234, timeout_minutes: int = 30, ep: int = 1) -> ParallelLayout:
    """Start torch.distributed (if needed) and megatron's model-parallel groups.

    Raises UserError with the key to fix when the world size does not split into tp x pp x dp
    (and the experts' tp x ep x pp).
    """
    from megatron.core import parallel_state, tensor_parallel

    check_not_importing_main()
    apply_cpu_shims()
    _slurm_to_torch_env()
    launched = "RANK" in os.environ
    world_size = int(os.environ["WORLD_SIZE"]) if launched else 1
    if tp < 1 or pp < 1 or world_size % (tp * pp) != 0:
        raise UserError(
            f"tp={tp} x pp={pp} does not divide the world size {world_size}: set tp= and pp= so that "
            f"tp*pp divides the number of processes (launch with torchrun --nproc-per-node=N or srun)"
        )
    if ep < 1 or world_size % (tp * ep * pp) != 0:
        raise UserError(f"tp={tp} x ep={ep} x pp={pp} does not divide the world size {world_size}: expert-parallel "
                        f"ranks come out of the data-parallel ones, so choose ep= dividing {world_size // (tp * pp)}")
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if launched:
            dist.init_process_group(backend=backend, timeout=timedelta(minutes=timeout_minutes))
        else:
            # A plain `python` process is a world of one: an in-memory store, no port to race for.
            dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1,
                                    timeout=timedelta(minutes=timeout_minutes))
    if parallel_state.model_parallel_is_initialized():
        if (
            parallel_state.get_tensor_model_parallel_world_size() != tp
            or parallel_state.get_pipeline_model_parallel_world_size() != pp
            or parallel_state.get_expert_model_parallel_world_size() != ep
        ):
            parallel_state.destroy_model_parallel()
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=tp,
            pipeline_model_parallel_size=pp,
            expert_model_parallel_size=ep,
            distributed_timeout_minutes=timeout_minutes,
        )
    seed_everything(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    return layout()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def layout() -> ParallelLayout:
    from megatron.core import parallel_state as ps

    return ParallelLayout(
        world_size=dist.get_world_size(),
        rank=dist.get_rank(),
        tp=ps.get_tensor_model_parallel_world_size(),
        pp=ps.get_pipeline_model_parallel_world_size(),
        dp=ps.get_data_parallel_world_size(),
        tp_rank=ps.get_tensor_model_parallel_rank(),
        pp_rank=ps.get_pipeline_model_parallel_rank(),
        dp_rank=ps.get_data_parallel_rank(),
        ep=ps.get_expert_model_parallel_world_size(),
    )


def destroy() -> None:
    """Tear down megatron's groups and the process group (tests and CLI exit). Groups exist only
    once megatron is imported; a command that failed on its input never imported it (nor should
    its exit, which would cost seconds)."""
    parallel_state = sys.modules.get("megatron.core.parallel_state")
    if parallel_state is not None and parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def is_main_process() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def from_main(value):
    """`value` as rank 0 has it, on every rank (collective; `value` itself in a world of one)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def sum_over_ranks(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` replaced in place by its sum over all ranks (collective; a no-op in a world of one).
    NCCL reduces device tensors only, so a host tensor makes the trip through the rank's GPU."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return tensor
    if dist.get_backend() == "nccl" and tensor.device.type == "cpu":
        on_device = tensor.to(device())
        dist.all_reduce(on_device)
        return tensor.copy_(on_device)
    dist.all_reduce(tensor)
    return tensor


def barrier() -> None:
    """Wait for every rank (a no-op in a process without torch.distributed)."""
    if dist.is_initialized():
        dist.barrier()
