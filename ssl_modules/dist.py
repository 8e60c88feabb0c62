"""Distributed helpers for losses that need the whole global batch (no Lightning import).

``gather`` concatenates a tensor from every rank *with gradients*: its backward sums the
incoming gradient over ranks (all-reduce) and returns this rank's slice. With DDP averaging
parameter gradients over ranks, the gradient of a per-rank loss ``L_r`` is then exactly the
gradient of ``mean_r L_r`` in one process — the property ``tests/test_ddp_gradients.py`` checks.

Outside ``torch.distributed`` (one process) every function is the identity.

- [0] SimCLR (global negatives across replicas), Chen et al., 2020, https://arxiv.org/abs/2002.05709
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    """True inside an initialised process group with more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    """Number of ranks (1 outside ``torch.distributed``)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    """This process's rank (0 outside ``torch.distributed``)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


class _GatherWithGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, tensor: torch.Tensor) -> torch.Tensor:
        ctx.batch_size = tensor.shape[0]
        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_output: torch.Tensor) -> torch.Tensor:
        # Every rank's loss may depend on this rank's rows: sum their gradients, keep our slice.
        grad = grad_output.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = dist.get_rank() * ctx.batch_size
        return grad[start : start + ctx.batch_size]


def gather(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` from all ranks along dim 0, differentiably.

    Every rank must pass the same shape (the training loaders use ``drop_last=True``).

    Shape: (batch_size, ...) -> (world_size * batch_size, ...), rank r's rows at
    ``r * batch_size : (r + 1) * batch_size``.
    """
    if not is_distributed():
        return tensor
    return _GatherWithGradient.apply(tensor)


@torch.no_grad()
def gather_no_grad(tensor: torch.Tensor) -> torch.Tensor:
    """``gather`` without gradient (e.g. MoCo keys entering the queue)."""
    if not is_distributed():
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)
