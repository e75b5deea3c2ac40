"""Data-parallel training on torch.distributed: process group set-up from torchrun's environment, devices.

``train.batch_size`` is the *global* batch: each of N processes takes batch_size / N
samples per step and DistributedDataParallel averages the gradients, so the
learning rate means the same thing whatever N is (no scaling rule needed).
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as torch_dist

from finetune.errors import Problem


@dataclass
class Dist:
    """This process's place in the job: rank and world size (1 when not distributed) and its device."""

    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum over all processes (float64)."""
        if not self.active:
            return list(values)
        tensor = torch.tensor(values, dtype=torch.float64, device=self._comm_device)
        torch_dist.all_reduce(tensor)
        return tensor.tolist()

    def sum_tensor(self, tensor: torch.Tensor) -> torch.Tensor:
        if not self.active:
            return tensor
        reduced = tensor.to(self._comm_device)
        torch_dist.all_reduce(reduced)
        return reduced.cpu()

    def gather(self, rows: torch.Tensor) -> torch.Tensor:
        """Every process's ``rows`` (any number each, the same trailing shape), concatenated in rank order."""
        if not self.active:
            return rows
        counts = torch.zeros(self.world, dtype=torch.float64)
        counts[self.rank] = len(rows)
        counts = [int(n) for n in self.sum_tensor(counts).tolist()]
        padded = torch.zeros((self.world, max(counts), *rows.shape[1:]), dtype=torch.float64)
        padded[self.rank, :len(rows)] = rows.double()  # float64 holds float32 values and small integers exactly
        padded = self.sum_tensor(padded)
        return torch.cat([padded[rank, :n] for rank, n in enumerate(counts)]).to(rows.dtype)

    def any(self, flag: bool) -> bool:
        """True on every process when it is true on any (so all stop at the same step)."""
        return bool(self.sum([float(flag)])[0]) if self.active else flag

    def barrier(self) -> None:
        if self.active:
            torch_dist.barrier()

    @property
    def _comm_device(self) -> torch.device:
        return self.device if torch_dist.get_backend() == "nccl" else torch.device("cpu")


def world_size() -> int:
    """The number of processes torchrun started (WORLD_SIZE), 1 when not distributed."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def problems(batch_size: int, sync_batchnorm: bool, device_type: str) -> list[Problem]:
    """A global ``train.batch_size`` that does not divide among the processes, and ``train.sync_batchnorm`` where
    torch cannot sync BatchNorm (``device_type`` is where training runs)."""
    found, world = [], world_size()
    if batch_size % world:
        found.append(Problem("train.batch_size", f"{batch_size} is the global batch and must divide evenly among "
                                                 f"{world} processes"))
    if world > 1 and sync_batchnorm and device_type != "cuda":
        found.append(Problem("train.sync_batchnorm", "needs CUDA (torch's SyncBatchNorm has no CPU implementation); "
                                                     "keep BatchNorm layers frozen in eval mode instead"))
    return found


def setup(device_type: str, timeout_s: float) -> Dist:
    """Join the process group torchrun describes in the environment (RANK, WORLD_SIZE...), if any.

    ``device_type``: cpu or cuda (``train.device`` resolved); ``timeout_s``: how long a collective may wait.
    """
    world = world_size()
    if world == 1:
        return Dist(device=torch.device(device_type))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if not torch_dist.is_initialized():
        torch_dist.init_process_group("nccl" if device_type == "cuda" else "gloo",
                                      timeout=timedelta(seconds=timeout_s))
    return Dist(rank=rank, world=world, device=device)


def teardown(dist: Dist) -> None:
    if dist.active and torch_dist.is_initialized():
        torch_dist.destroy_process_group()


def launch(nproc: int, argv: list[str]) -> int:
    """Run ``finetune <argv>`` in ``nproc`` processes on this machine through torchrun; returns its exit code."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "finetune", *argv]
    return subprocess.call(command)
