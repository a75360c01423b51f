"""Process-group setup from torchrun / SLURM environment, rank helpers and reductions."""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .errors import UserError


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0  # under CUDA: this process's device index (cuda_device_index)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def _env_from_slurm() -> None:
    """Fill torchrun-style variables from SLURM's when a job step was started by plain srun."""
    if "RANK" in os.environ or "SLURM_PROCID" not in os.environ:
        return
    if int(os.environ.get("SLURM_NTASKS", "1")) <= 1:
        return
    os.environ["RANK"] = os.environ["SLURM_PROCID"]
    os.environ["WORLD_SIZE"] = os.environ["SLURM_NTASKS"]
    os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")
    os.environ.setdefault("MASTER_PORT", "29500")
    if "MASTER_ADDR" not in os.environ:
        nodes = os.environ.get("SLURM_STEP_NODELIST") or os.environ.get("SLURM_NODELIST", "")
        # First host of a simple list "host[1-3],x" -> "host1"; scontrol is the robust way and
        # scripts/slurm_train.sbatch sets MASTER_ADDR itself.
        first = nodes.split(",")[0]
        if "[" in first:
            stem, rng = first.split("[", 1)
            first = stem + rng.split("-")[0].split(",")[0].rstrip("]")
        os.environ["MASTER_ADDR"] = first or "127.0.0.1"


RESTART_HINT = ("torchrun restarts need TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 in torchrun's "
                "environment: with the rendezvous store shared with the workers (the default) "
                "a restarted group reads the dead workers' addresses and cannot connect "
                "(pytorch/pytorch#135712)")


def restart_store_problem() -> bool:
    """Whether this torchrun may restart workers that will then fail to form a group."""
    return (os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
            and int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0") or 0) > 0)


def cuda_device_index(local_rank: int) -> int:
    """This process's GPU: its local rank, or 0 where the launcher bound one GPU to each
    process (srun --gpus-per-task=1 or --gpu-bind: each task sees one device; torchrun sets
    LOCAL_WORLD_SIZE, and its processes share the devices they see)."""
    count = torch.cuda.device_count()
    if count == 1 and int(os.environ.get("LOCAL_WORLD_SIZE", "1")) == 1:
        return 0
    if local_rank >= count:
        raise UserError(f"local rank {local_rank} has no GPU: this process sees {count} CUDA "
                        f"devices (CUDA_VISIBLE_DEVICES="
                        f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); start one "
                        f"process per GPU")
    return local_rank


def init(device_kind: str) -> DistInfo:
    """Join the process group when launched by torchrun (or srun); a no-op otherwise."""
    _env_from_slurm()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    backend = "nccl" if device_kind == "cuda" else "gloo"
    if device_kind == "cuda":
        local_rank = cuda_device_index(local_rank)
        torch.cuda.set_device(local_rank)
    if restart_store_problem():
        if int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0) > 0:
            # Measured with torch 2.14: the group either fails to connect or waits forever.
            raise UserError(f"not restarting: {RESTART_HINT}")
        if rank == 0:
            print(f"warning: {RESTART_HINT}", flush=True)
    if not dist.is_initialized():
        # A bounded timeout: a dead peer turns a collective into an error, never a hang.
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=10))
    return DistInfo(rank, world, local_rank)


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(values: list[float] | torch.Tensor, device: torch.device,
                   info: DistInfo) -> list[float]:
    """Sum a few floats over ranks (one collective); identity on one process.

    A device tensor is reduced where it is (a copy) and read once: no host round trip first.
    """
    if torch.is_tensor(values):
        t = values.to(device=device, dtype=torch.float64, copy=True)
    else:
        t = torch.tensor(values, dtype=torch.float64, device=device)
    if info.enabled:
        dist.all_reduce(t)
    return t.tolist()


def any_rank(flag: bool, device: torch.device, info: DistInfo) -> bool:
    """True on every rank if it is true on any rank."""
    if not info.enabled:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def min_over_ranks(value: int, device: torch.device, info: DistInfo) -> int:
    """The smallest of the ranks' values (every rank gets it)."""
    if not info.enabled:
        return value
    t = torch.tensor([float(value)], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


def all_reduce_tensors(tensors: list[torch.Tensor], info: DistInfo) -> None:
    """Sum ``tensors`` in place over ranks: one collective over a float64 flat copy."""
    if not info.enabled or not tensors:
        return
    flat = torch.cat([t.reshape(-1).double() for t in tensors])
    dist.all_reduce(flat)
    parts = flat.split([t.numel() for t in tensors])
    torch._foreach_copy_(tensors, [v.view_as(t) for v, t in zip(parts, tensors, strict=True)])


def broadcast_tensors(tensors: list[torch.Tensor], info: DistInfo) -> None:
    """Overwrite ``tensors`` in place with rank 0's values."""
    if info.enabled:
        for t in tensors:
            dist.broadcast(t, src=0)


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def broadcast_object(obj, info: DistInfo):
    """Rank 0's object on every rank."""
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
