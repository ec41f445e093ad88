"""Where and how a trial runs: device, precision, compilation, and torch.distributed (env://)."""

from __future__ import annotations

import os
import resource
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from trainer.config import RuntimeConfig


def process_group_timeout(cfg: RuntimeConfig) -> timedelta:
    """How long a collective (a barrier while rank 0 evaluates) may wait before the group fails."""
    return timedelta(minutes=cfg.dist_timeout_min)


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    bf16: bool
    compile: bool
    compile_mode: str | None = None  # torch.compile's mode: None (default) or "reduce-overhead" (CUDA graphs)
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def autocast(self):
        if not self.bf16:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def any_process(self, flag: bool) -> bool:
        """True on every process when it is True on any: processes that saw a stop signal at
        different steps would otherwise wait for each other forever (checkpoint vs gradient sync)."""
        if not self.distributed:
            return flag
        value = torch.tensor([float(flag)], device=self.device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item())


def setup_runtime(cfg: RuntimeConfig) -> Runtime:
    """Resolve `auto` settings and join the process group when torchrun/submitit set WORLD_SIZE."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available() if cfg.device == "auto" else cfg.device == "cuda"
    if cuda and not torch.cuda.is_available():
        raise RuntimeError("runtime.device is 'cuda' but no CUDA device is available")
    if cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo", init_method="env://",
                                timeout=process_group_timeout(cfg))
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and cuda)
    compile_ = cfg.compile in ("on", "reduce-overhead") or (cfg.compile == "auto" and cuda)
    mode = "reduce-overhead" if cfg.compile == "reduce-overhead" else None
    return Runtime(device=device, bf16=bf16, compile=compile_, compile_mode=mode, rank=rank, local_rank=local_rank,
                   world_size=world_size)


def teardown_runtime(runtime: Runtime) -> None:
    if runtime.distributed and dist.is_initialized():
        dist.destroy_process_group()


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
