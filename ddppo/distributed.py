"""torch.distributed plumbing for DD-PPO: rendezvous from torchrun or SLURM, flat all-reduces, and the
straggler-preemption counter."""

from __future__ import annotations

import os
import socket
import subprocess
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

# torch.distributed.nn's functions take ``group=group.WORLD`` as a default argument, evaluated when the module is
# first imported: lazily, by torch's compiler stack, when the first optimiser is built. Imported after
# init_process_group, those defaults held the default process group for good, so destroy_process_group() could not
# free it and Gloo's threads outlived train(); one of them dropping a tensor while Python shut down aborted the rank
# ("terminate called without an active exception": one 2-rank test run in 5 to 15 on 2 cores). Imported first,
# they are None. (Builds without torch.distributed have neither the module nor the problem.)
if dist.is_available():
    import torch.distributed.nn  # noqa: F401


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    store: dist.Store | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def ranks_from_env(environ=os.environ) -> tuple[int, int, int]:
    """(rank, local_rank, world_size) from torchrun's variables, else SLURM's, else a single process."""
    if "RANK" in environ and "WORLD_SIZE" in environ:
        return int(environ["RANK"]), int(environ.get("LOCAL_RANK", 0)), int(environ["WORLD_SIZE"])
    if "SLURM_PROCID" in environ and "SLURM_NTASKS" in environ:
        return int(environ["SLURM_PROCID"]), int(environ.get("SLURM_LOCALID", 0)), int(environ["SLURM_NTASKS"])
    return 0, 0, 1


def first_slurm_host(nodelist: str) -> str:
    """First host of a SLURM node list such as 'gpu[03-05,09],cpu1' (scontrol when present, else parsed)."""
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=10)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.split()[0]
    except (OSError, subprocess.TimeoutExpired):
        pass
    head = nodelist.split(",")[0]
    if "[" in head:
        prefix, rest = head.split("[", 1)
        first = rest.rstrip("]").split(",")[0].split("-")[0]
        return prefix + first
    return head


def resolve_device(device_cfg: str = "auto", local_rank: int = 0) -> torch.device:
    """The config's ``device`` as a torch device: ``auto`` is CUDA when available; a CUDA device without an index is
    the worker's local rank's GPU."""
    if device_cfg == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(device_cfg)
    return torch.device(f"cuda:{local_rank}") if device.type == "cuda" and device.index is None else device


def resolve_sim_device(sim_device_cfg: str, device: torch.device | str) -> torch.device:
    """Where the simulator runs: ``sim.device``, or with ``auto`` the training device."""
    return torch.device(device) if sim_device_cfg == "auto" else torch.device(sim_device_cfg)


def init_distributed(device_cfg: str = "auto", backend: str = "auto", timeout_s: float = 600) -> DistInfo:
    rank, local_rank, world = ranks_from_env()
    device = resolve_device(device_cfg, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world == 1:
        return DistInfo(device=device)
    if "MASTER_ADDR" not in os.environ:
        os.environ["MASTER_ADDR"] = first_slurm_host(os.environ.get("SLURM_JOB_NODELIST", socket.gethostname()))
    if "MASTER_PORT" not in os.environ:
        os.environ["MASTER_PORT"] = str(20000 + int(os.environ.get("SLURM_JOB_ID", "0")) % 20000)
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    timeout = timedelta(seconds=timeout_s)
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true":
        # torchrun's agent keeps its store across restarts (--max-restarts): the process group's keys from the
        # attempt that died are still there, and a restarted rank would read a dead peer's address. Each attempt
        # gets its own key space. (With TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1, which a replaced node needs to
        # rejoin, rank 0 hosts a new store every attempt, and the restart counts of the nodes differ: a new
        # node's agent counts from 0. There the plain rendezvous below is right and a count prefix would hang.)
        store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False,
                              timeout=timeout)
        attempt = dist.PrefixStore(f"ddppo_attempt{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)
        dist.init_process_group(backend, store=attempt, rank=rank, world_size=world, timeout=timeout)
    else:
        dist.init_process_group(backend, rank=rank, world_size=world, timeout=timeout)
    # A second store (same server, own key space) for the preemption counter: TCPStore ops never block on
    # collectives, which is the point of a straggler signal.
    store = dist.PrefixStore("ddppo_rollouts", dist.distributed_c10d._get_default_store())
    return DistInfo(rank, world, local_rank, device, store)


def is_lost_peer(error: BaseException) -> bool:
    """Whether ``error`` is a collective or a store operation failing because another worker is gone (its node failed,
    or it was killed): torch.distributed's own errors (the TCPStore, NCCL) and Gloo's transport errors, which reach
    Python as plain RuntimeErrors raised in gloo/transport/."""
    return isinstance(error, getattr(dist, "DistError", ())) or (
        isinstance(error, RuntimeError) and "gloo/transport" in str(error))


def all_reduce_sum(values: list[float] | torch.Tensor, info: DistInfo) -> torch.Tensor:
    """One flat all-reduce of several numbers (float64 on the collective's device)."""
    t = torch.as_tensor(values, dtype=torch.float64)
    if info.enabled:
        t = t.to(info.device if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(t)
    return t.cpu()


def broadcast_module(module: torch.nn.Module, info: DistInfo) -> None:
    """Identical initial weights everywhere: rank 0's parameters and buffers win."""
    if not info.enabled:
        return
    for t in list(module.parameters()) + list(module.buffers()):
        dist.broadcast(t.data, src=0)


class RolloutCounter:
    """DD-PPO's straggler signal: how many workers finished collecting this round.

    Each round has its own key, so no reset is needed and a fast worker that starts the next round can never
    erase an increment another worker has not read yet (habitat-baselines resets one shared key: a race).
    """

    def __init__(self, info: DistInfo):
        self.store = info.store
        self.round = 0

    def finished(self) -> None:
        if self.store is not None:
            self.store.add(f"done_{self.round}", 1)

    def count(self) -> int:
        return self.store.add(f"done_{self.round}", 0) if self.store is not None else 0

    def next_round(self) -> None:
        # every rank has passed the update's all-reduce, so nobody reads the old key any more
        if self.store is not None and self.round > 0:
            try:
                self.store.delete_key(f"done_{self.round - 1}")
            except (RuntimeError, NotImplementedError):
                pass
        self.round += 1
