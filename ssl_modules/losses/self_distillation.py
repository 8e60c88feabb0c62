"""Self-distillation and clustering losses over multi-crop views: DINO and SwAV (Sinkhorn-Knopp).

Plain ``nn.Module``s (no Lightning), computed in float32 with autocast off. Both need statistics
of the *global* batch under DDP — DINO's center, SwAV's equipartition of the codes — and take them
with an all-reduce of sums (no gradient flows through either), so a batch split over ranks gives
the same loss as the whole batch in one process. Outside ``torch.distributed`` the all-reduce is
the identity.

- [0] DINO, Caron et al., 2021, https://arxiv.org/abs/2104.14294
- [1] SwAV, Caron et al., 2020, https://arxiv.org/abs/2006.09882
- [2] Sinkhorn distances, Cuturi, 2013, https://arxiv.org/abs/1306.0895
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as torch_dist
import torch.nn.functional as F
from torch import nn

from ssl_modules import dist


def _all_reduce(tensor: torch.Tensor, op: str = "sum", enabled: bool = True) -> torch.Tensor:
    """Sum (or max) of ``tensor`` over every rank, in place and without gradient; the identity in
    one process or when ``enabled`` is False. All ranks must pass the same shape."""
    if enabled and dist.is_distributed():
        reduce_op = torch_dist.ReduceOp.MAX if op == "max" else torch_dist.ReduceOp.SUM
        torch_dist.all_reduce(tensor, op=reduce_op)
    return tensor


def _compute_dtype(tensor: torch.Tensor) -> torch.dtype:
    """float64 stays float64 (exact tests); everything else (bf16, fp16, fp32) is computed in float32."""
    return torch.float64 if tensor.dtype == torch.float64 else torch.float32


def _check_temperature(name: str, value: float) -> None:
    if value < 1e-4:
        raise ValueError(f"{name} must be >= 1e-4 (the softmax overflows below); got {value}")


def _check_outputs(name: str, outputs: Sequence[torch.Tensor]) -> None:
    if isinstance(outputs, torch.Tensor) or len(outputs) == 0:
        raise ValueError(f"{name} must be a non-empty list of (batch_size, dim) tensors, one per crop")
    first = outputs[0]
    for output in outputs:
        if output.ndim != 2 or output.shape != first.shape:
            raise ValueError(
                f"every tensor in {name} must have the same shape (batch_size, dim); "
                f"got {[tuple(o.shape) for o in outputs]}"
            )


class DINOLoss(nn.Module):
    """DINO: cross-entropy from the centred, sharpened teacher to the student, over crop pairs.

    For teacher output ``t`` of global crop ``i`` and student output ``s`` of crop ``v != i``::

        P_t = softmax((t - c) / tau_t)          P_s = softmax(s / tau_s)
        H(P_t, P_s) = -sum_k P_t[k] log P_s[k]   (mean over the batch)
        L = mean over the pairs (i, v), v != i, of H

    The teacher sees the global crops only; the student sees every crop (global crops first, in
    the teacher's order), so a crop is never compared with itself. After the loss, the center
    moves as an EMA of the mean *raw* teacher output over the global batch (all ranks):
    ``c <- m c + (1 - m) mean(t)``; centering and sharpening together avoid collapse (paper,
    sec. 3.1 and 5.3). The center moves in training mode only.

    The teacher temperature is a pure function of the step: a linear warm-up from
    ``warmup_teacher_temperature`` at step 0 to ``teacher_temperature`` at
    ``warmup_teacher_temperature_steps``, then constant. The paper warms it from 0.04 to 0.07
    over 30 epochs; its code's default, used here, is 0.04 throughout ("anything above 0.07 is
    unstable").

    Teacher outputs must come from the teacher under ``torch.no_grad()`` (the stop-gradient lives
    in the method); a teacher output that requires grad raises.

    - [0] DINO, Caron et al., 2021, https://arxiv.org/abs/2104.14294

    Args:
        out_dim: K, the width of the head's output (paper: 65536).
        student_temperature: tau_s (paper: 0.1).
        teacher_temperature: tau_t after the warm-up (paper code: 0.04).
        warmup_teacher_temperature: tau_t at step 0 (paper: 0.04).
        warmup_teacher_temperature_steps: length of the linear warm-up in optimizer steps (0: none).
        center_momentum: m, the EMA momentum of the center (paper: 0.9).
        gather_distributed: take the center's batch mean over all ranks under DDP.

    Shape: teacher_outputs: list of num_global_crops tensors (batch_size, out_dim);
    student_outputs: list of num_crops >= num_global_crops tensors (batch_size, out_dim), global
    crops first; returns a scalar. ``center``: (out_dim,).
    """

    center: torch.Tensor

    def __init__(
        self,
        out_dim: int = 65536,
        student_temperature: float = 0.1,
        teacher_temperature: float = 0.04,
        warmup_teacher_temperature: float = 0.04,
        warmup_teacher_temperature_steps: int = 0,
        center_momentum: float = 0.9,
        gather_distributed: bool = True,
    ) -> None:
        super().__init__()
        if out_dim < 1:
            raise ValueError(f"out_dim must be >= 1; got {out_dim}")
        _check_temperature("student_temperature", student_temperature)
        _check_temperature("teacher_temperature", teacher_temperature)
        _check_temperature("warmup_teacher_temperature", warmup_teacher_temperature)
        if warmup_teacher_temperature_steps < 0:
            raise ValueError(
                f"warmup_teacher_temperature_steps must be >= 0; got {warmup_teacher_temperature_steps}"
            )
        if not 0.0 <= center_momentum < 1.0:
            raise ValueError(
                f"center_momentum must be in [0, 1) (1 would freeze the center at 0); got {center_momentum}"
            )
        self.out_dim = out_dim
        self.student_temperature = student_temperature
        self.teacher_temperature = teacher_temperature
        self.warmup_teacher_temperature = warmup_teacher_temperature
        self.warmup_teacher_temperature_steps = warmup_teacher_temperature_steps
        self.center_momentum = center_momentum
        self.gather_distributed = gather_distributed
        self.register_buffer("center", torch.zeros(out_dim))

    def teacher_temperature_at(self, step: int) -> float:
        """tau_t at optimizer step ``step``: linear warm-up, then constant."""
        if step >= self.warmup_teacher_temperature_steps:
            return self.teacher_temperature
        progress = step / self.warmup_teacher_temperature_steps
        return self.warmup_teacher_temperature + progress * (
            self.teacher_temperature - self.warmup_teacher_temperature
        )

    def forward(
        self,
        teacher_outputs: Sequence[torch.Tensor],
        student_outputs: Sequence[torch.Tensor],
        step: int = 0,
    ) -> torch.Tensor:
        _check_outputs("teacher_outputs", teacher_outputs)
        _check_outputs("student_outputs", student_outputs)
        if teacher_outputs[0].shape != student_outputs[0].shape:
            raise ValueError(
                f"teacher and student outputs must have the same shape (batch_size, {self.out_dim}); got "
                f"{tuple(teacher_outputs[0].shape)} and {tuple(student_outputs[0].shape)}"
            )
        if teacher_outputs[0].shape[1] != self.out_dim:
            raise ValueError(
                f"expected outputs of width out_dim={self.out_dim}; got {teacher_outputs[0].shape[1]}"
            )
        if len(student_outputs) < len(teacher_outputs) or len(student_outputs) < 2:
            raise ValueError(
                "student_outputs must hold every crop, the teacher's global crops first, and at least 2 crops; "
                f"got {len(student_outputs)} student and {len(teacher_outputs)} teacher outputs"
            )
        if any(output.requires_grad for output in teacher_outputs):
            raise ValueError(
                "teacher outputs require grad: compute the teacher's forward under torch.no_grad()"
            )
        device_type = student_outputs[0].device.type
        with torch.autocast(device_type=device_type, enabled=False):
            teacher_temperature = self.teacher_temperature_at(step)
            dtype = _compute_dtype(student_outputs[0])
            center = self.center.to(dtype)
            targets = [
                F.softmax((t.to(dtype) - center) / teacher_temperature, dim=1) for t in teacher_outputs
            ]
            log_probs = [
                F.log_softmax(s.to(dtype) / self.student_temperature, dim=1) for s in student_outputs
            ]
            total = student_outputs[0].new_zeros((), dtype=dtype)
            pairs = 0
            for i, target in enumerate(targets):  # target: (batch_size, out_dim)
                for v, log_prob in enumerate(log_probs):
                    if v == i:  # the same view: skipped
                        continue
                    total = total + (-(target * log_prob).sum(dim=1)).mean()
                    pairs += 1
            loss = total / pairs
        if self.training:
            self.update_center(teacher_outputs)
        return loss

    @torch.no_grad()
    def update_center(self, teacher_outputs: Sequence[torch.Tensor]) -> None:
        """``c <- m c + (1 - m) * mean(t)``, the mean over every global crop of the global batch."""
        stacked = torch.cat(
            [t.to(_compute_dtype(t)) for t in teacher_outputs]
        )  # (num_global_crops * batch_size, out_dim)
        total = _all_reduce(stacked.sum(dim=0), enabled=self.gather_distributed)  # (out_dim,)
        count = torch.tensor(float(len(stacked)), device=stacked.device)
        count = _all_reduce(count, enabled=self.gather_distributed)
        batch_center = total / count
        self.center.mul_(self.center_momentum).add_(
            batch_center.to(self.center.dtype), alpha=1 - self.center_momentum
        )


@torch.no_grad()
def sinkhorn(
    scores: torch.Tensor,
    epsilon: float = 0.05,
    iterations: int = 3,
    gather_distributed: bool = True,
) -> torch.Tensor:
    """SwAV's codes: Sinkhorn-Knopp on ``exp(scores / epsilon)``, equipartitioned over the prototypes.

    With ``Q = exp(scores / epsilon)^T / sum`` (prototypes x samples), each iteration scales
    the rows to sum 1/K (every prototype gets an equal share of the batch), then the columns to
    sum 1/B (every sample has unit mass). After the last iteration the columns sum exactly to
    1/B and the rows approximately to 1/K; the codes are ``B * Q^T``, each row a distribution over
    the prototypes. Under DDP ``B`` is the global batch and the total and row sums are all-reduced,
    as in the paper's ``distributed_sinkhorn``. No gradient.

    - [1] SwAV, Caron et al., 2020, https://arxiv.org/abs/2006.09882 (sec. 3.1, Algorithm 1)
    - [2] Sinkhorn distances, Cuturi, 2013, https://arxiv.org/abs/1306.0895

    Args:
        scores: similarities of embeddings to prototypes. Shape: (batch_size, num_prototypes).
        epsilon: the entropy regularisation (paper: 0.05).
        iterations: Sinkhorn-Knopp iterations (paper: 3).
        gather_distributed: equipartition over the global batch under DDP.

    Returns: codes. Shape: (batch_size, num_prototypes), rows summing to 1.
    """
    if scores.ndim != 2:
        raise ValueError(f"scores must have shape (batch_size, num_prototypes); got {tuple(scores.shape)}")
    if epsilon <= 0:
        raise ValueError(f"epsilon must be > 0; got {epsilon}")
    if iterations < 1:
        raise ValueError(f"iterations must be >= 1; got {iterations}")
    with torch.autocast(device_type=scores.device.type, enabled=False):
        scores = scores.to(_compute_dtype(scores))
        # A scalar shift cancels in the first normalisation; it keeps exp() finite. It must be
        # the same on every rank, hence the max over the global batch.
        shift = _all_reduce(scores.max().clone(), op="max", enabled=gather_distributed)
        plan = torch.exp((scores - shift) / epsilon).T  # (num_prototypes, batch_size)
        num_prototypes = plan.shape[0]
        global_batch = plan.shape[1] * (dist.world_size() if gather_distributed else 1)
        plan = plan / _all_reduce(plan.sum(), enabled=gather_distributed)
        for _ in range(iterations):
            row_sums = _all_reduce(plan.sum(dim=1, keepdim=True), enabled=gather_distributed)
            plan = plan / row_sums / num_prototypes  # each prototype: 1/K of the mass
            plan = plan / plan.sum(dim=0, keepdim=True) / global_batch  # each sample: 1/B
        return (plan * global_batch).T


class SwAVLoss(nn.Module):
    """SwAV's swapped prediction: predict the code of one crop from the scores of every other crop.

    Codes ``q_i = sinkhorn(scores_i)`` are computed, without gradient, for the global crops only
    (the paper's ``crops_for_assign``); with a queue of past embeddings the Sinkhorn runs on the
    queue's scores followed by the batch's, and the codes of the batch (the last rows) are kept,
    so small batches still equipartition over enough samples. Then::

        p_v = softmax(scores_v / temperature)
        L = mean over global crops i of  mean over crops v != i of  -mean_batch sum_k q_i[k] log p_v[k]

    ``scores`` are the prototype layer's outputs on L2-normalised embeddings with L2-normalised
    prototypes (the method normalises them before each step).

    - [1] SwAV, Caron et al., 2020, https://arxiv.org/abs/2006.09882

    Args:
        temperature: of the swapped prediction's softmax (paper: 0.1).
        sinkhorn_epsilon: Sinkhorn's epsilon (paper: 0.05).
        sinkhorn_iterations: Sinkhorn-Knopp iterations (paper: 3).
        gather_distributed: equipartition over the global batch under DDP.

    Shape: global_scores: list of num_global_crops tensors (batch_size, num_prototypes);
    local_scores: list of num_local_crops tensors (batch_size, num_prototypes); queue_scores:
    None or a list with one entry per global crop, each None or (queue_size, num_prototypes);
    returns a scalar.
    """

    def __init__(
        self,
        temperature: float = 0.1,
        sinkhorn_epsilon: float = 0.05,
        sinkhorn_iterations: int = 3,
        gather_distributed: bool = True,
    ) -> None:
        super().__init__()
        _check_temperature("temperature", temperature)
        if sinkhorn_epsilon <= 0:
            raise ValueError(f"sinkhorn_epsilon must be > 0; got {sinkhorn_epsilon}")
        if sinkhorn_iterations < 1:
            raise ValueError(f"sinkhorn_iterations must be >= 1; got {sinkhorn_iterations}")
        self.temperature = temperature
        self.sinkhorn_epsilon = sinkhorn_epsilon
        self.sinkhorn_iterations = sinkhorn_iterations
        self.gather_distributed = gather_distributed

    @torch.no_grad()
    def codes(
        self,
        global_scores: Sequence[torch.Tensor],
        queue_scores: Sequence[torch.Tensor | None] | None = None,
    ) -> list[torch.Tensor]:
        """The targets q_i of the global crops, without gradient (shape of each: (batch_size, num_prototypes))."""
        if queue_scores is not None and len(queue_scores) != len(global_scores):
            raise ValueError(
                f"queue_scores needs one entry (or None) per global crop: {len(global_scores)}; got {len(queue_scores)}"
            )
        codes = []
        for i, scores in enumerate(global_scores):
            queued = None if queue_scores is None else queue_scores[i]
            if queued is not None:
                if queued.ndim != 2 or queued.shape[1] != scores.shape[1]:
                    raise ValueError(
                        f"queue scores must have shape (queue_size, {scores.shape[1]}); got {tuple(queued.shape)}"
                    )
                scores = torch.cat([queued.to(scores.dtype), scores])  # (queue_size + batch_size, K)
            assigned = sinkhorn(
                scores, self.sinkhorn_epsilon, self.sinkhorn_iterations, self.gather_distributed
            )
            codes.append(assigned[-len(global_scores[i]) :])  # the batch's rows follow the queue's
        return codes

    def forward(
        self,
        global_scores: Sequence[torch.Tensor],
        local_scores: Sequence[torch.Tensor] = (),
        queue_scores: Sequence[torch.Tensor | None] | None = None,
    ) -> torch.Tensor:
        _check_outputs("global_scores", global_scores)
        all_scores = list(global_scores) + list(local_scores)
        _check_outputs("global_scores + local_scores", all_scores)
        if len(all_scores) < 2:
            raise ValueError("SwAV needs at least 2 crops (one to assign, one to predict it)")
        device_type = all_scores[0].device.type
        with torch.autocast(device_type=device_type, enabled=False):
            targets = self.codes(global_scores, queue_scores)  # no gradient: the codes are targets
            dtype = _compute_dtype(all_scores[0])
            log_probs = [F.log_softmax(s.to(dtype) / self.temperature, dim=1) for s in all_scores]
            total = all_scores[0].new_zeros((), dtype=dtype)
            for i, target in enumerate(targets):
                sub_loss = total.new_zeros(())
                for v, log_prob in enumerate(log_probs):
                    if v == i:  # a crop does not predict its own code
                        continue
                    sub_loss = sub_loss + (-(target.to(dtype) * log_prob).sum(dim=1)).mean()
                total = total + sub_loss / (len(all_scores) - 1)
            return total / len(targets)
