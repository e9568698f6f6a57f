"""torchrun / DDP plumbing: process group from the environment, per-network DDP wrappers.

Each network gets its own DistributedDataParallel wrapper (one DDP over G and D together breaks
with "Expected to have finished reduction" when the phases backward through different parts).
``broadcast_buffers=False``: a BatchNorm discriminator is called on fakes and then reals before
one backward; re-broadcasting its running stats at every call would modify a tensor autograd
still needs (use ``--sync_bn`` for batch statistics over all processes instead). Running
statistics are therefore rank-local; checkpoints hold rank 0's. Parameters stay identical.
"""
from __future__ import annotations

import datetime
import os
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    initialised_here: bool = False

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup(device: str = "auto") -> DistInfo:
    """Join the process group torchrun describes (WORLD_SIZE, RANK, LOCAL_RANK), if any."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError("--device cuda was requested but no CUDA device is visible")
        dev = torch.device("cuda", local if world > 1 else (torch.device(device).index or 0))
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    info = DistInfo(rank, local, world, dev)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=10),
                                device_id=dev if dev.type == "cuda" else None)
        info.initialised_here = True
    return info


def teardown(info: DistInfo) -> None:
    if info.initialised_here and dist.is_initialized():
        dist.destroy_process_group()


def wrap(net: torch.nn.Module, info: DistInfo, sync_bn: bool = False) -> torch.nn.Module:
    if sync_bn:  # (refused on one process too, where it would silently do nothing)
        # SyncBatchNorm replaces torch's BatchNorm layers only: a network normalising with its own
        # modules (BigGAN's ccbn / bn, stored_mean buffers) would keep per-process statistics unsaid
        from ganengine.nn.batch_norm_act import ConditionalBatchNormAct2d, convert_sync_batchnorm

        own = sorted({type(m).__name__ for m in net.modules()
                      if (hasattr(m, "stored_mean") or isinstance(m, ConditionalBatchNormAct2d))
                      and not isinstance(m, torch.nn.modules.batchnorm._BatchNorm)})
        if own:
            raise ValueError(f"--sync_bn converts torch's BatchNorm layers; this network normalises with its own "
                             f"({', '.join(own)}: BigGAN's class-conditional batch norm), which would keep per-process "
                             "statistics: leave --sync_bn out")
        if info.device.type != "cuda":
            raise ValueError("--sync_bn needs CUDA devices (PyTorch's SyncBatchNorm runs on GPUs only); "
                             "leave it out on CPU")
    if not info.enabled:
        return net
    if sync_bn:
        net = convert_sync_batchnorm(net)  # (keeps the fused batch norms' activations)
    if not any(p.requires_grad for p in net.parameters()):
        return net  # e.g. a frozen stage-I generator inside StackGAN stage II
    ids = [info.device.index] if info.device.type == "cuda" else None
    with warnings.catch_warnings():  # newer torch renames it; the old flag keeps the no-sync meaning
        warnings.filterwarnings("ignore", message=".*broadcast_buffers.*", category=FutureWarning)
        # a network whose passes leave some heads unused (InfoGAN's D) says so
        return torch.nn.parallel.DistributedDataParallel(net, device_ids=ids, broadcast_buffers=False,
                                                         find_unused_parameters=getattr(net, "ddp_find_unused_parameters", False))


def any_true(flag: bool, info: DistInfo, device: torch.device) -> bool:
    """True on every rank when ``flag`` is true on any rank (stop together, never hang)."""
    if not info.enabled:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def mean_over_ranks(values: list[float], info: DistInfo) -> list[float]:
    """Each value averaged over the processes (every rank passes as many, in the same order): the
    logged losses are the global batch's, as one process with all the images would log them."""
    if not info.enabled or not values:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=info.device)
    dist.all_reduce(t)
    return (t / info.world_size).tolist()


def gather_objects(obj, info: DistInfo) -> list:
    if not info.enabled:
        return [obj]
    out = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()
