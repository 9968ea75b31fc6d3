"""Data-parallel training under ``torchrun``: one process per device, PyTorch's own stack only.

Rollouts are split by prompt: rank r rolls out the step's prompts r, r + W, r + 2W, ... (W ranks),
each as a whole tree, so group advantages need no communication, and a prompt's tree is seeded by
(seed, step, its position in the step) alone: the same trees whatever the world size.

The update is FSDP2 (``fully_shard`` per decoder layer and on the root): fp32 sharded master
parameters and AdamW state, compute in the rollout dtype (``MixedPrecisionPolicy``), gradients
reduced and accumulated in fp32. FSDP's division of the reduced gradients by the world size is off
at the source (the update's loss is already the mean over every rank's tokens), so the gradient is
the sum over ranks, as torchtitan does it. Each rank's engine runs on a full copy of the weights in the
rollout dtype (``sharded_policy.ShardedPolicy.rollout_model``), refreshed in place from the shards once a
step, after its last optimizer step (``ShardedPolicy.sync_rollout``); its storage may be freed
during the update (``release_rollout_copy``) and is allocated again by that refresh (the engine
then recaptures its CUDA graphs if it moved).

A plain ``python -m arpo_fast.train`` does not come here: one process keeps the zero-copy path
(the engine on the trained model's own bf16 weights, fp32 masters in ``optim.MasterWeights``).
"""

from __future__ import annotations

import contextlib
import datetime
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as dist

from arpo_fast.train.checkpoint import CheckpointError


@dataclass
class Timeouts:
    """Seconds a rank may wait for the others, by what it waits for."""

    setup: float = 1800.0
    """Setup and checkpoints: loading, the demo's warm start, writing and reading checkpoints."""
    rollout: float = 1800.0
    """The first rank done with a step's rollout (or an evaluation) waiting for the last."""
    update: float = 600.0
    """A collective of the update (FSDP's gathers and reductions): a longer wait means a rank hangs."""

    @classmethod
    def of(cls, cfg) -> Timeouts:
        """From the run's settings: ``--dist-timeout-s``, when given, stands for all three."""
        if cfg.dist_timeout_s:
            return cls(cfg.dist_timeout_s, cfg.dist_timeout_s, cfg.dist_timeout_s)
        return cls(cfg.setup_timeout_s, cfg.rollout_timeout_s, cfg.update_timeout_s)


@dataclass
class Dist:
    """This process's place in the run and the few collectives the trainer uses.

    Collectives run on the default process group (gloo or NCCL, the update's timeout) unless a
    ``group`` is named: ``setup_group`` and ``rollout_group`` are gloo groups with the setup's and the
    rollout's timeouts (long waits happen there, so the update's collectives can fail fast), and
    ``save_group`` serves asynchronous checkpoint writes, which run in a thread of their own."""

    rank: int
    world: int
    local_rank: int
    device: torch.device
    setup_group: object = None
    rollout_group: object = None
    save_group: object = None
    timeouts: Timeouts = field(default_factory=Timeouts)
    replicas: int = 1
    """HSDP: the ranks form this many groups, each holding the whole state sharded over it."""
    _mesh: object = None

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def mesh(self):
        """FSDP2's device mesh: None (1-D over every rank) without HSDP, else (replicate, shard) of
        (replicas, world / replicas): ranks r*S .. r*S + S - 1 shard one replica (a node, with
        consecutive ranks per node), and gradients are summed across the replicas too."""
        if self.replicas > 1 and self._mesh is None:
            from torch.distributed.device_mesh import init_device_mesh

            shape = (self.replicas, self.world // self.replicas)
            self._mesh = init_device_mesh(self.device.type, shape, mesh_dim_names=("replicate", "shard"))
        return self._mesh

    def _reduce(self, values: Sequence[float], op, group=None) -> list[float]:
        device = self._comm_device if group is None else torch.device("cpu")
        t = torch.tensor(list(values), dtype=torch.float64, device=device)
        dist.all_reduce(t, op=op, group=group)
        return t.tolist()

    @property
    def _comm_device(self) -> torch.device:
        return self.device if dist.get_backend() == "nccl" else torch.device("cpu")

    def sum(self, values: Sequence[float]) -> list[float]:
        return self._reduce(values, dist.ReduceOp.SUM)

    def max(self, values: Sequence[float], group=None) -> list[float]:
        return self._reduce(values, dist.ReduceOp.MAX, group)

    def gather(self, obj, group=None) -> list:
        """Every rank's ``obj`` (picklable), on every rank."""
        out = [None] * self.world
        dist.all_gather_object(out, obj, group=group)
        return out

    def broadcast(self, obj, group=None):
        """Rank 0's ``obj`` (picklable), on every rank."""
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=group)
        return box[0]

    def barrier(self, group=None) -> None:
        dist.barrier(group=group)

    def mine(self, n: int) -> list[int]:
        """This rank's share of ``n`` items (prompts of a step): every W-th from its rank on."""
        return list(range(self.rank, n, self.world))


def launched_by_torchrun() -> bool:
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR"))


def env_rank() -> int:
    """This process's rank under torchrun, else 0."""
    return int(os.environ["RANK"]) if launched_by_torchrun() else 0


FLIGHT_RECORDER = {
    "TORCH_FR_BUFFER_SIZE": "2000",  # the last 2,000 collectives of each rank, in a ring buffer
    "TORCH_NCCL_TRACE_BUFFER_SIZE": "2000",  # its name before torch 2.6
    "TORCH_NCCL_DUMP_ON_TIMEOUT": "1",  # written out when a collective times out
}
"""NCCL's flight recorder: on a timeout each rank dumps its recent collectives (to
``/tmp/nccl_trace_rank_<rank>`` unless ``TORCH_FR_DUMP_TEMP_FILE`` says otherwise), which
``torchfrtrace`` reads to name the rank that hung. Settings already in the environment are kept."""


def enable_flight_recorder(backend: str, environ=os.environ) -> None:
    """Switch the flight recorder on for an NCCL run; it must happen before the process group
    exists (NCCL reads these when it is created)."""
    if backend == "nccl":
        for key, value in FLIGHT_RECORDER.items():
            environ.setdefault(key, value)


def _seconds(s: float) -> datetime.timedelta:
    return datetime.timedelta(seconds=s)


def init(
    device: str, timeouts: Optional[Timeouts] = None, async_save: bool = False, replicas: int = 1
) -> Optional[Dist]:
    """Join the process group when started by ``torchrun`` (None otherwise). ``device``: the
    ``--device`` setting; under torchrun a CUDA run uses ``cuda:LOCAL_RANK``. A rank that waits
    longer than ``timeouts`` allow fails, so a rank that hangs cannot hold the others forever.
    ``replicas``: ``--hsdp-replicas``, which must divide the number of processes."""
    if not launched_by_torchrun():
        if replicas > 1:
            raise ValueError(f"--hsdp-replicas {replicas} needs torchrun (one process has no replicas)")
        return None
    timeouts = timeouts or Timeouts()
    rank, world, local = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if cuda:
        if not torch.cuda.is_available():
            raise ValueError(f"--device {device!r} asked for, but torch sees no CUDA device")
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    else:
        dev = torch.device("cpu")
    backend = "nccl" if cuda else "gloo"
    enable_flight_recorder(backend)
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=_seconds(timeouts.update))
    # every rank creates the same groups in the same order (new_group is collective)
    setup = dist.new_group(backend="gloo", timeout=_seconds(timeouts.setup))
    rollout = dist.new_group(backend="gloo", timeout=_seconds(timeouts.rollout))
    save = dist.new_group(backend="gloo", timeout=_seconds(timeouts.setup)) if async_save else None
    if world % replicas:  # every rank finds it: rank 0 says it once
        raise AgreedError(f"--hsdp-replicas {replicas} must divide the number of processes ({world})")
    return Dist(rank, world, local, dev, setup, rollout, save, timeouts, replicas)


class AgreedError(ValueError):
    """An error of the setup that every rank of a distributed run raises together (the first
    failing rank's message), so that rank 0 alone reports it."""


@contextlib.contextmanager
def agreed(d: Optional[Dist]):
    """Run a phase of the setup; in a distributed run the ranks then compare notes, and if any
    failed, all raise :class:`AgreedError` with the first failure's message."""
    if d is None:
        yield
        return
    error = None
    try:
        yield
    except (ValueError, KeyError, TypeError, CheckpointError, OSError) as exc:
        error = describe_error(exc)
    failed = [(rank, e) for rank, e in enumerate(d.gather(error, group=d.setup_group)) if e is not None]
    if failed:
        raise AgreedError(failed[0][1])


def describe_error(exc: BaseException) -> str:
    """One line for the user: the message, or for a failed file operation the path and the reason
    (``OSError.args[0]`` alone is only the errno)."""
    if isinstance(exc, OSError) and exc.strerror:
        where = " -> ".join(str(f) for f in (exc.filename, exc.filename2) if f is not None)
        return f"{where}: {exc.strerror}" if where else exc.strerror
    text = str(exc.args[0]) if exc.args else str(exc) or type(exc).__name__
    return " ".join(text.split())


FAILED_KEY = "arpo_fast/first_failure"


def first_to_fail(rank: int) -> bool:
    """Claim, in the job's store, the first failure of the run for ``rank``: whether no other rank
    failed before. A rank whose collective broke because another rank died stays quiet then, and
    only the rank that failed first reports. True when the store cannot be reached."""
    try:
        store = dist.distributed_c10d._get_default_store()
        won = store.compare_set(FAILED_KEY, "", str(rank))
        return (won.decode() if isinstance(won, bytes) else str(won)) == str(rank)
    except Exception:  # noqa: BLE001 - no store, no process group: this rank reports
        return True


def close(d: Optional[Dist]) -> None:
    if d is not None and dist.is_initialized():
        dist.destroy_process_group()  # every group with it


def report_error(text: str, rank: int, ranked: bool) -> None:
    """Print an error of this process; in a distributed run only when no other rank failed first
    (a rank whose collective broke because another one died would add a misleading second
    error, such as gloo's "Connection closed by peer")."""
    if ranked and not first_to_fail(rank):
        return
    where = f" (rank {rank})" if ranked else ""
    print(f"arpo_fast.train: error{where}: {text}", file=sys.stderr, flush=True)
