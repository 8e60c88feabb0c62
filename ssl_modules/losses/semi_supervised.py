"""Losses of the semi-supervised family: distillation, consistency, pseudo-labels, entropy.

Plain functions and ``nn.Module``s, no Lightning. Targets (teacher logits, weak-view
probabilities, pseudo-labels) are taken as given: the stop-gradient happens in the method,
visibly, with ``torch.no_grad()``.

- [0] Knowledge distillation, Hinton et al., 2015, https://arxiv.org/abs/1503.02531
- [1] Mean Teacher, Tarvainen & Valpola, 2017, https://arxiv.org/abs/1703.01780
- [2] FixMatch, Sohn et al., 2020, https://arxiv.org/abs/2001.07685
- [3] Pseudo-Label, Lee, 2013, https://www.kaggle.com/blobs/download/forum-message-attachment-files/746/pseudo_label_final.pdf
- [4] Entropy minimization, Grandvalet & Bengio, 2005, https://papers.nips.cc/paper/2740-semi-supervised-learning-by-entropy-minimization
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def _check_logits(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> None:
    if student_logits.shape != teacher_logits.shape or student_logits.ndim != 2:
        raise ValueError(
            f"student and teacher logits must both have shape (batch_size, num_classes); got "
            f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}"
        )


def _check_temperature(temperature: float) -> None:
    if not temperature > 0 or math.isinf(temperature):
        raise ValueError(f"temperature must be a finite number > 0; got {temperature}")


def distillation_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float
) -> torch.Tensor:
    """``T^2 * KL(softmax(teacher / T) || softmax(student / T))``, averaged over the batch.

    The ``T^2`` factor keeps the soft targets' gradient magnitude roughly constant as ``T``
    grows (the gradient of the KL term scales as ``1 / T^2``).

    - [0] Knowledge distillation, Hinton et al., 2015, https://arxiv.org/abs/1503.02531

    Args:
        student_logits: Shape: (batch_size, num_classes); carries the gradient.
        teacher_logits: Shape: (batch_size, num_classes); a target (computed without gradient).
        temperature: softmax temperature ``T > 0``.

    Returns: a scalar.
    """
    _check_logits(student_logits, teacher_logits)
    _check_temperature(temperature)
    student_log_probs = F.log_softmax(student_logits.float() / temperature, dim=1)
    teacher_log_probs = F.log_softmax(teacher_logits.float() / temperature, dim=1)
    kl = F.kl_div(student_log_probs, teacher_log_probs, reduction="batchmean", log_target=True)
    return temperature**2 * kl


def softmax_mse_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean Teacher's consistency: ``||softmax(student) - softmax(teacher)||^2 / num_classes``,
    averaged over the batch (the mean over every element).

    - [1] Mean Teacher, Tarvainen & Valpola, 2017, https://arxiv.org/abs/1703.01780

    Args:
        student_logits: Shape: (batch_size, num_classes).
        teacher_logits: Shape: (batch_size, num_classes).
    """
    _check_logits(student_logits, teacher_logits)
    return F.mse_loss(student_logits.float().softmax(dim=1), teacher_logits.float().softmax(dim=1))


class ConsistencyLoss(nn.Module):
    """Student/teacher consistency, ``"mse"`` (softmax-MSE, Mean Teacher's default) or ``"kl"``
    (temperature-scaled KL with the ``T^2`` factor: the distillation loss).

    - [0] Knowledge distillation, Hinton et al., 2015, https://arxiv.org/abs/1503.02531
    - [1] Mean Teacher, Tarvainen & Valpola, 2017, https://arxiv.org/abs/1703.01780

    Args:
        kind: ``"mse"`` or ``"kl"``.
        temperature: softmax temperature of ``"kl"`` (``"mse"`` compares plain softmaxes).

    Shape: student_logits, teacher_logits (batch_size, num_classes) -> scalar.
    """

    def __init__(self, kind: str = "mse", temperature: float = 1.0) -> None:
        super().__init__()
        if kind not in ("mse", "kl"):
            raise ValueError(f"consistency kind must be 'mse' or 'kl'; got {kind!r}")
        _check_temperature(temperature)
        self.kind = kind
        self.temperature = temperature

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        if self.kind == "mse":
            return softmax_mse_loss(student_logits, teacher_logits)
        return distillation_loss(student_logits, teacher_logits, self.temperature)


def check_confidence_threshold(confidence_threshold: float) -> None:
    if not 0.0 <= confidence_threshold <= 1.0:
        raise ValueError(f"confidence_threshold must be in [0, 1]; got {confidence_threshold}")


class FixMatchLoss(nn.Module):
    """FixMatch's unlabeled loss: ``1/(mu B) sum_b 1(max q_b >= tau) H(argmax q_b, p(strong_b))``.

    The mean runs over the whole unlabeled batch (masked-out images count as zeros), as in the
    paper, so the loss weight grows as more predictions pass the threshold.

    - [2] FixMatch, Sohn et al., 2020, https://arxiv.org/abs/2001.07685

    Args:
        confidence_threshold: ``tau`` in [0, 1]; pseudo-labels below it are ignored.

    Forward:
        strong_logits: Shape: (batch_size, num_classes); the strong view, carries the gradient.
        weak_probs: Shape: (batch_size, num_classes); the weak view's class probabilities (a target).

    Returns: ``(loss, mask)``, a scalar and the float mask of kept pseudo-labels, shape (batch_size,).
    """

    def __init__(self, confidence_threshold: float = 0.95) -> None:
        super().__init__()
        check_confidence_threshold(confidence_threshold)
        self.confidence_threshold = confidence_threshold

    def forward(
        self, strong_logits: torch.Tensor, weak_probs: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        _check_logits(strong_logits, weak_probs)
        confidence, pseudo_labels = weak_probs.max(dim=1)
        mask = (confidence >= self.confidence_threshold).float()
        loss = weighted_pseudo_label_loss(strong_logits, pseudo_labels, mask)
        return loss, mask


def weighted_pseudo_label_loss(
    logits: torch.Tensor, pseudo_labels: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """``1/N sum_i w_i CE(logits_i, pseudo_label_i)``: confidence-weighted (or masked, with 0/1
    weights) pseudo-label cross-entropy, averaged over the whole batch. With soft targets
    ``t_i`` (rows summing to 1) the cross-entropy is ``-sum_c t_ic log softmax(logits_i)_c``.

    - [3] Pseudo-Label, Lee, 2013, https://www.kaggle.com/blobs/download/forum-message-attachment-files/746/pseudo_label_final.pdf

    Args:
        logits: Shape: (batch_size, num_classes); carries the gradient.
        pseudo_labels: Shape: (batch_size,), int64 class indices, or (batch_size, num_classes) soft targets.
        weights: Shape: (batch_size,), >= 0 (confidences, or a 0/1 mask).
    """
    soft = pseudo_labels.ndim == 2
    if (
        logits.ndim != 2
        or pseudo_labels.shape[:1] != logits.shape[:1]
        or (soft and pseudo_labels.shape != logits.shape)
        or weights.shape != logits.shape[:1]
    ):
        raise ValueError(
            f"expected logits (batch_size, num_classes), pseudo_labels (batch_size,) or like logits, and weights "
            f"(batch_size,); got {tuple(logits.shape)}, {tuple(pseudo_labels.shape)}, {tuple(weights.shape)}"
        )
    if len(logits) == 0:
        return logits.sum() * 0.0
    if soft:
        per_image = -(pseudo_labels.float() * F.log_softmax(logits.float(), dim=1)).sum(dim=1)
        return (per_image * weights.float()).mean()
    per_image = F.cross_entropy(logits.float(), pseudo_labels, reduction="none")
    return (per_image * weights.float()).mean()


def entropy_loss(logits: torch.Tensor) -> torch.Tensor:
    """Mean prediction entropy ``-1/N sum_i sum_c p_ic log p_ic``: minimising it pushes the
    decision boundary away from dense unlabeled regions.

    - [4] Entropy minimization, Grandvalet & Bengio, 2005, https://papers.nips.cc/paper/2740-semi-supervised-learning-by-entropy-minimization

    Args:
        logits: Shape: (batch_size, num_classes).
    """
    if logits.ndim != 2:
        raise ValueError(f"logits must have shape (batch_size, num_classes); got {tuple(logits.shape)}")
    log_probs = F.log_softmax(logits.float(), dim=1)
    return -(log_probs.exp() * log_probs).sum(dim=1).mean()


def sigmoid_rampup(step: int, rampup_steps: int) -> float:
    """Mean Teacher's ramp-up ``exp(-5 (1 - t)^2)``, ``t = step / rampup_steps`` clipped to [0, 1];
    1 throughout when ``rampup_steps`` is 0. A pure function of the step.

    - [1] Mean Teacher, Tarvainen & Valpola, 2017, https://arxiv.org/abs/1703.01780
    """
    if rampup_steps <= 0:
        return 1.0
    progress = min(1.0, max(0.0, step / rampup_steps))
    return math.exp(-5.0 * (1.0 - progress) ** 2)
