"""torchrun support shared by training and evaluation (DESIGN §7): join the process group (the backend
follows the device: gloo on CPU, nccl on CUDA), this process's rank / world size / main-process test,
broadcast, gather, all-reduce, and closing the group.

:func:`join` is what a command calls at start (``nft train``, ``nft eval``); :func:`current` describes a
group someone else initialised (a library call such as :func:`nft_cuda.eval.monte_carlo` under a user's
torchrun script). A single process is an inactive :class:`Group` of one, on which every collective is
the identity, so callers never branch on "distributed or not".
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from nft_cuda._args import resolve_device

# --------------------------------------------------------------------------------------------------
# Distributed (torchrun) support (DESIGN §7)
# --------------------------------------------------------------------------------------------------
#
# Under ``torchrun`` (WORLD_SIZE > 1) every rank runs :func:`train`. The model is *not* wrapped in
# DistributedDataParallel: OVF calls the model N+1 times per step (sequential mode) or once on a
# sample-stacked batch, IRS adds forward hooks and heads, and DDP's reducer expects exactly one forward
# per backward with a fixed set of used parameters (find_unused_parameters=False complains, True costs a
# graph walk per step and still assumes one forward). Instead every rank starts from rank 0's parameters
# and buffers, and after each backward the gradients are averaged with one all-reduce over a flat buffer
# in the fixed ``model.parameters()`` order. That works for any number of forward calls, keeps every
# rank's parameters (and optimizer states) identical, and is deterministic: same seed, same world size,
# same device → bit-identical weights. BatchNorm statistics stay per rank while training (as DDP without
# SyncBatchNorm); rank 0's buffers are broadcast before validation and checkpointing, so every rank holds
# the model rank 0 checkpoints.


RANK_STREAM = 0x5EED_D1A7  # mixes the rank into the training-noise seed of ranks > 0


class Group:
    """This process's place in a torchrun group; a single-process run is an inactive group of one."""

    def __init__(
        self,
        dist=None,
        rank: int = 0,
        world: int = 1,
        created: bool = False,
        device: torch.device | None = None,
        group=None,
    ):
        self.dist, self.rank, self.world, self.created, self.device = dist, rank, world, created, device
        self.group = group  # the torch.distributed process group (None: the world)

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def close(self) -> None:
        if self.created and self.dist is not None and self.dist.is_initialized():
            self.dist.destroy_process_group()
        self.created = False

    def barrier(self) -> None:
        if self.active:
            self.dist.barrier(group=self.group)

    def global_rank(self, rank: int) -> int:
        """The world rank of ``rank`` of this group."""
        return rank if self.group is None else self.dist.get_global_rank(self.group, rank)

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        """Rank ``src``'s ``tensor`` on every rank, in place (every rank passes a tensor of the same
        shape and dtype on :attr:`device`)."""
        if self.active:
            self.dist.broadcast(tensor, src=self.global_rank(src), group=self.group)
        return tensor

    def broadcast_object(self, obj):
        """Rank 0's ``obj`` on every rank (also a barrier)."""
        if not self.active:
            return obj
        box = [obj if self.is_main else None]
        self.dist.broadcast_object_list(box, src=self.global_rank(0), group=self.group)
        return box[0]

    def gather_objects(self, obj) -> list:
        if not self.active:
            return [obj]
        boxes = [None] * self.world
        self.dist.all_gather_object(boxes, obj, group=self.group)
        return boxes

    def broadcast_tensors(self, tensors) -> None:
        """Overwrite ``tensors`` with rank 0's values, in order."""
        if not self.active:
            return
        for t in tensors:
            self.broadcast(t.data, 0)

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """All-reduce (sum) ``tensor`` in place over the ranks."""
        if self.active:
            self.dist.all_reduce(tensor, group=self.group)
        return tensor

    def average_gradients(self, params: Sequence[torch.Tensor]) -> None:
        """Average the gradients of ``params`` over the ranks (in place), in the order given.

        A parameter without a gradient on some rank but with one elsewhere takes zeros there; one without a
        gradient on every rank keeps ``grad=None`` (the optimizer then skips it, as in one process).
        """
        if not self.active or not params:
            return
        from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

        device = params[0].device
        present = torch.tensor([p.grad is not None for p in params], dtype=torch.int32, device=device)
        self.sum_(present)
        used = [p for p, n in zip(params, present.tolist()) if n > 0]
        for p in used:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        groups: dict[tuple, list[torch.Tensor]] = {}
        for p in used:
            groups.setdefault((p.grad.device, p.grad.dtype), []).append(p.grad)
        for grads in groups.values():
            flat = _flatten_dense_tensors(grads)
            self.sum_(flat)
            flat.div_(self.world)
            for g, avg in zip(grads, _unflatten_dense_tensors(flat, grads)):
                g.copy_(avg)


def join(device_name: str = "auto") -> Group:
    """Join the torchrun process group when launched with WORLD_SIZE > 1, or use one that is already
    initialised. The backend follows the device: ``cpu`` → gloo, ``cuda`` / ``auto`` with CUDA present →
    nccl on ``cuda:LOCAL_RANK``. Close it with :meth:`Group.close` (only a group it created is destroyed)."""
    try:
        import torch.distributed as dist
    except ImportError:  # pragma: no cover - builds without distributed support
        dist = None
    available = dist is not None and dist.is_available()
    initialised = available and dist.is_initialized()
    world = dist.get_world_size() if initialised else int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return Group()
    if not available:
        raise RuntimeError(f"WORLD_SIZE={world} but this torch build has no torch.distributed support")
    local_rank = int(os.environ.get("LOCAL_RANK", "0") or 0)
    if device_name == "cuda" or (device_name == "auto" and torch.cuda.is_available()):
        device_name = f"cuda:{local_rank}"
    device = resolve_device(device_name)
    created = False
    if not initialised:
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend)
        created = True
    return Group(dist, dist.get_rank(), dist.get_world_size(), created, device)


class ShardSampler(torch.utils.data.Sampler):
    """One rank's contiguous slice of the epoch's permutation (drawn from ``generator``, the same on every
    rank); the remainder of ``n // world`` is dropped so every rank runs the same number of steps."""

    def __init__(self, n: int, rank: int, world: int, generator: torch.Generator):
        self.n, self.rank, self.world, self.generator = n, rank, world, generator
        self.per_rank = n // world

    def __len__(self) -> int:
        return self.per_rank

    def __iter__(self):
        perm = torch.randperm(self.n, generator=self.generator)
        return iter(perm[self.rank * self.per_rank : (self.rank + 1) * self.per_rank].tolist())


def current(group=None, distributed: bool | None = None) -> Group:
    """The already-initialised process group ``group`` (default: the world) as a :class:`Group`, or an
    inactive group of one when torch.distributed is not initialised (or ``distributed`` is False). Its
    :attr:`Group.device` is where the collectives run: the current CUDA device with nccl, else the CPU."""
    import torch.distributed as dist

    initialised = dist.is_available() and dist.is_initialized()
    if distributed is None:
        distributed = initialised
    if not distributed:
        return Group()
    if not initialised:
        raise RuntimeError(
            "distributed=True needs torch.distributed to be initialised "
            "(torchrun + torch.distributed.init_process_group)"
        )
    backend = str(dist.get_backend(group)).lower()
    device = torch.device("cuda", torch.cuda.current_device()) if "nccl" in backend else torch.device("cpu")
    return Group(dist, dist.get_rank(group), dist.get_world_size(group), False, device, group)


def is_main(group=None) -> bool:
    """Whether this process is the one that writes files: rank 0, or the only process."""
    return current(group).is_main
