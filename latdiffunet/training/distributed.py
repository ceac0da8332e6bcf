"""Data-parallel training over several processes (one per GPU; gloo on CPU), started by torchrun.

``torchrun --nproc_per_node N -m latdiffunet.training.cli DATASET FOLD ...`` (or
``latdiff_train DATASET FOLD --nproc N``, which calls torchrun's own entry point) starts N copies of
the trainer. Each reads ``WORLD_SIZE`` / ``RANK`` / ``LOCAL_RANK`` from the environment
(:meth:`DistributedContext.from_environment`), joins one process group (NCCL on ``cuda:LOCAL_RANK``,
gloo on the CPU) and trains on its own share of every batch:

* **The plans' batch size is the global batch.** Each rank draws ``batch / N`` patches from its
  own stream (seeded by seed, epoch and rank, :func:`stream_seed`); a batch that N does not divide
  is refused (:func:`local_batch_size`), so every rank holds an equal share and a mean over a
  rank's images is its share of the mean over the global batch. The foreground-forced patches
  (the last ones of a global batch) are spread over the ranks as they would lie in one process
  (:func:`local_foreground_fraction`).
* **Gradients are averaged** with one all-reduce of all trained gradients after ``backward``
  (:meth:`DistributedContext.average_gradients`): DDP's arithmetic without its wrapper, because
  the trainer calls the model's parts (``encode_mask``, ``denoise``, ...) rather than one
  ``forward``, trains other parameters in each stage, and uses some only in some steps.
* **Losses that are not a mean over images** (batch soft Dice, class-weighted cross-entropy and
  masked means, whose denominators depend on the whole batch) sum their statistics over all ranks
  with :meth:`DistributedContext.batch_sum`, an all-reduce that autograd differentiates, so the
  averaged gradient is exactly the one-process gradient of the global batch
  (``tests/test_distributed.py``).
* **Rank 0 alone** logs, plots, writes checkpoints and JSON files, validates and calibrates the
  sampling temperature; the others wait at a barrier. What every rank must agree on is decided
  once and broadcast (the epoch plan of ``--budget-minutes``) or reduced over all ranks (the latent
  scale); the weights and the EMA stay identical because every rank applies the same averaged
  gradients to the same starting weights (broadcast from rank 0).
"""

from __future__ import annotations

import datetime
import math
import os
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import torch
import torch.distributed as dist

from latdiffunet.errors import UserInputError

# Ranks other than 0 wait at a barrier while rank 0 validates; NCCL's default 10-minute timeout
# would end a run whose periodic validation takes longer.
PROCESS_GROUP_TIMEOUT = datetime.timedelta(minutes=60)


class _SumOverRanks(torch.autograd.Function):
    """All-reduce (sum) whose backward is the same all-reduce of the incoming gradients.

    Every rank computes the same loss from the summed statistics; the gradient of rank r's share
    is the sum over ranks of d loss / d statistic = N x that of one process, and the gradient
    average (/ N) of :meth:`DistributedContext.average_gradients` brings it back to 1 x.
    """

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        total = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(total)
        return total

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        total = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(total)
        return total


@dataclass(frozen=True)
class DistributedContext:
    """Where this process stands among the training processes; one process by default.

    Every collective below is a no-op in one process, so the trainer has one code path.
    """

    world_size: int = 1
    rank: int = 0
    local_rank: int = 0

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None) -> "DistributedContext":
        """torchrun's ``WORLD_SIZE`` / ``RANK`` / ``LOCAL_RANK``; one process when they are absent."""
        env = os.environ if environ is None else environ
        try:
            world, rank, local = (int(env.get(k, d)) for k, d in (("WORLD_SIZE", "1"), ("RANK", "0"), ("LOCAL_RANK", "0")))
        except ValueError:
            raise UserInputError(
                f"WORLD_SIZE / RANK / LOCAL_RANK must be integers, got {env.get('WORLD_SIZE')!r} / {env.get('RANK')!r} / "
                f"{env.get('LOCAL_RANK')!r}", fix="start several processes with torchrun, which sets them",
            ) from None
        if world < 1 or not 0 <= rank < world or local < 0:
            raise UserInputError(f"inconsistent WORLD_SIZE={world}, RANK={rank}, LOCAL_RANK={local}",
                                 fix="start several processes with torchrun, which sets them")
        return cls(world, rank, local)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes files and validates."""
        return self.rank == 0

    def device(self, device_type: str) -> torch.device:
        """``cuda:LOCAL_RANK`` (made current) for CUDA, else the device type itself."""
        if device_type != "cuda":
            return torch.device(device_type)
        if self.local_rank >= torch.cuda.device_count():
            raise UserInputError(
                f"LOCAL_RANK {self.local_rank} but only {torch.cuda.device_count()} CUDA device(s) visible",
                fix="start at most as many processes per node as it has GPUs (torchrun --nproc_per_node)",
            )
        torch.cuda.set_device(self.local_rank)
        return torch.device("cuda", self.local_rank)

    # ------------------------------------------------------------------ collectives
    def batch_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` summed over the ranks, differentiably (each holds a share of the batch)."""
        return _SumOverRanks.apply(tensor) if self.enabled else tensor

    def average_gradients(self, parameters: Sequence[torch.nn.Parameter]) -> None:
        """Replace each gradient by its mean over the ranks, in one all-reduce.

        Parameters without a gradient are left out: every rank uses the same ones in a step (the
        losses branch on the epoch and the configuration, never on a rank's data).
        """
        if not self.enabled:
            return
        grads = [p.grad for p in parameters if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat.div_(self.world_size)
        for g, averaged in zip(grads, flat.split([g.numel() for g in grads])):
            g.copy_(averaged.view_as(g))

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """``(world_size, *tensor.shape)``: every rank's ``tensor`` (no gradient)."""
        if not self.enabled:
            return tensor[None]
        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(parts, tensor.detach().contiguous())
        return torch.stack(parts)

    def mean_over_ranks(self, tensor: torch.Tensor) -> torch.Tensor:
        """The mean of ``tensor`` over the ranks (no gradient); for logged numbers."""
        if not self.enabled:
            return tensor
        total = tensor.detach().clone()
        dist.all_reduce(total)
        return total / self.world_size

    def broadcast_from_main(self, values: dict[str, int | float]) -> dict[str, int | float]:
        """Rank 0's ``values`` on every rank (numbers, sent as one float64 tensor; ints stay ints)."""
        if not self.enabled:
            return values
        keys = sorted(values)
        sent = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=_collective_device(self))
        dist.broadcast(sent, src=0)
        return {k: type(values[k])(v) for k, v in zip(keys, sent.tolist())}

    def broadcast_module_(self, module: torch.nn.Module) -> None:
        """Rank 0's parameters and buffers into ``module`` on every rank (identical starting weights)."""
        if not self.enabled:
            return
        with torch.no_grad():
            for tensor in list(module.parameters()) + list(module.buffers()):
                dist.broadcast(tensor.data, src=0)

    def barrier(self) -> None:
        if not self.enabled:
            return
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[self.local_rank])
        else:
            dist.barrier()


def _collective_device(context: DistributedContext) -> torch.device:
    """Where tensors made for a collective must live: NCCL only moves CUDA tensors."""
    return torch.device("cuda", context.local_rank) if dist.get_backend() == "nccl" else torch.device("cpu")


def init_process_group(context: DistributedContext, device: torch.device) -> None:
    """Join torchrun's process group: NCCL for CUDA devices, gloo otherwise (CPU)."""
    if not context.enabled or dist.is_initialized():
        return
    if device.type == "cuda":
        dist.init_process_group("nccl", timeout=PROCESS_GROUP_TIMEOUT, device_id=device)
    else:
        dist.init_process_group("gloo", timeout=PROCESS_GROUP_TIMEOUT)


def destroy_process_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


# ---------------------------------------------------------------------- the global batch
def local_batch_size(global_batch: int, world_size: int) -> int:
    """This rank's share of the global batch; refused unless ``world_size`` divides it."""
    if global_batch % world_size:
        lower, upper = (global_batch // world_size) * world_size, math.ceil(global_batch / world_size) * world_size
        raise UserInputError(
            f"the global batch size {global_batch} cannot be split evenly over {world_size} processes",
            fix=f"pass --batch-size {upper} or {max(lower, world_size)} (a multiple of {world_size}), or use a number "
                f"of processes that divides {global_batch}",
        )
    return global_batch // world_size


def local_foreground_fraction(global_batch: int, fraction: float, rank: int, world_size: int) -> float:
    """The foreground-forced share of rank ``rank``'s patches, so the global batch has as many as one process would.

    One process forces the last ``round(B * fraction)`` patches of its batch (round half up, as
    :meth:`PatchDataLoader.num_forced_foreground`); rank r holds global positions
    ``[r * b, (r + 1) * b)`` and forces those of them that fall into that tail.
    """
    b = local_batch_size(global_batch, world_size)
    forced = int(np.floor(global_batch * fraction + 0.5))
    first_forced = global_batch - forced
    mine = min(max((rank + 1) * b - max(first_forced, rank * b), 0), b)
    return mine / b


def stream_seed(seed: int, epoch: int, rank: int) -> int:
    """The seed of one epoch's data stream and noise draws on one rank (distinct per pair, 32 bits)."""
    return int(np.random.SeedSequence([int(seed), int(epoch), int(rank)]).generate_state(1)[0])


# ---------------------------------------------------------------------- launching
def launch_torchrun(nproc: int, module: str, argv: Sequence[str]) -> int:
    """Run ``python -m module *argv`` in ``nproc`` processes on this machine through torchrun.

    torchrun's own entry point (``torch.distributed.run``) does the rendezvous (``--standalone``:
    a free local port) and sets the environment each process reads; when one process fails it
    stops the others. Returns the first failed process's exit code, 0 when all succeeded.
    """
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun_main

    try:
        torchrun_main(["--standalone", f"--nproc_per_node={int(nproc)}", "-m", module, *argv])
    except ChildFailedError as exc:
        codes = [f.exitcode for f in exc.failures.values()]
        return next((c for c in codes if c), 1)
    return 0


def pooled_std(groups: torch.Tensor) -> float:
    """Unbiased standard deviation of the union of groups given as rows ``(count, mean, sum of
    squared deviations from that mean)`` (Chan et al.'s pairwise update), e.g. one row per rank:
    the result equals ``torch.cat(all values).std()`` without moving the values."""
    g = groups.detach().double().cpu()
    count, mean, m2 = g[:, 0], g[:, 1], g[:, 2]
    total = count.sum()
    grand_mean = (count * mean).sum() / total
    m2_total = m2.sum() + (count * (mean - grand_mean) ** 2).sum()
    return math.sqrt(float(m2_total) / max(float(total) - 1, 1.0))
