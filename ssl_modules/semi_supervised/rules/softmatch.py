"""SoftMatch's rule: truncated-Gaussian weights on the confidence, with uniform alignment.

- [0] SoftMatch, Chen et al., 2023, https://arxiv.org/abs/2301.10921
"""

from __future__ import annotations

import math

import torch

from ssl_modules import dist as ssl_dist
from ssl_modules.semi_supervised.rules.base import (
    DistributionAlignment,
    PseudoLabelRule,
    PseudoLabels,
    _check_unit,
    global_mean,
)


class SoftMatchWeights(PseudoLabelRule):
    """SoftMatch: every pseudo-label is kept, weighted by a Gaussian of its confidence truncated
    at the running mean confidence.

    With ``c = max UA(q)`` the confidence of the (uniformly aligned) weak-view prediction,
    ``w = max_weight`` where ``c >= mu_t``, else
    ``w = max_weight * exp(-(c - mu_t)^2 / (2 sigma_t^2 / num_sigmas^2))``. ``mu_t`` and
    ``sigma_t^2`` are EMAs (``momentum``) of the mean and the unbiased variance of ``c`` over the
    global batch (every DDP rank's images), starting at ``1 / num_classes`` and ``1``; they move
    with training batches only. The target is the hard pseudo-label ``argmax q`` of the
    prediction *before* alignment: uniform alignment (``UA(q) = normalize(q / p_model)``,
    ``p_model`` the EMA of the mean prediction, ``rules.DistributionAlignment``) only sets the
    weights, so that weakly-learned classes get larger weights without moving the labels.

    ``num_sigmas = 2`` is the authors' implementation's (USB's ``SoftMatchWeightingHook``,
    ``n_sigma``): the Gaussian's width is ``sigma_t / 2``, a prediction one ``sigma_t`` below the
    mean gets ``exp(-2) = 0.14``.

    - [0] SoftMatch, Chen et al., 2023, https://arxiv.org/abs/2301.10921
    - [1] USB (the authors' implementation), Wang et al., 2022, https://arxiv.org/abs/2208.07204

    Args:
        momentum: EMA momentum of ``mu_t``, ``sigma_t^2`` and the alignment's ``p_model`` (0.999).
        num_sigmas: how many Gaussian widths fit in one ``sigma_t`` (2).
        max_weight: ``lambda_max``, the weight of a confident prediction (1).
        uniform_alignment: weigh by the uniformly aligned prediction (True: the paper's SoftMatch).

    Shape: probs (batch_size, num_classes) -> targets (batch_size,) int64, weights (batch_size,).
    """

    def __init__(
        self,
        momentum: float = 0.999,
        num_sigmas: float = 2.0,
        max_weight: float = 1.0,
        uniform_alignment: bool = True,
    ) -> None:
        _check_unit("momentum", momentum)
        if not (num_sigmas > 0 and math.isfinite(num_sigmas)):
            raise ValueError(f"num_sigmas must be a finite number > 0 (SoftMatch: 2); got {num_sigmas}")
        if not (max_weight > 0 and math.isfinite(max_weight)):
            raise ValueError(
                f"max_weight (lambda_max) must be a finite number > 0 (SoftMatch: 1); got {max_weight}"
            )
        # the aligner lives in the base's ``alignment`` slot (so it is checkpointed and moves with
        # training only), but it is no constructor argument: ``uniform_alignment`` rebuilds it
        super().__init__(DistributionAlignment(momentum) if uniform_alignment else None)
        self.momentum = momentum
        self.num_sigmas = num_sigmas
        self.max_weight = max_weight
        self.uniform_alignment = uniform_alignment
        # NaN until ``allocate`` knows the number of classes (mu_0 = 1 / num_classes)
        self.register_buffer("confidence_mean", torch.tensor(float("nan")))
        self.register_buffer("confidence_variance", torch.tensor(1.0))
        self.register_buffer("last_mean_weight", torch.tensor(float("nan")), persistent=False)

    def allocate(self, num_classes: int, num_samples: int | None = None) -> None:
        super().allocate(num_classes, num_samples)
        if torch.isnan(self.confidence_mean):  # keep a loaded checkpoint's statistics
            self.confidence_mean.fill_(1.0 / num_classes)

    def forward(self, probs: torch.Tensor, index: torch.Tensor | None = None) -> PseudoLabels:
        pseudo = super().forward(probs, index)  # weights from the aligned prediction
        # the label is the prediction's own: uniform alignment only sets the weights
        return PseudoLabels(probs.detach().argmax(dim=1), pseudo.weights)

    def update(self, probs: torch.Tensor, index: torch.Tensor | None) -> None:
        if len(probs) == 0:
            return
        confidence = probs.max(dim=1).values  # (U,)
        # one all-reduce: E[c] and E[c^2] of the global batch (every rank has U images)
        moments = global_mean(torch.stack([confidence.mean(), confidence.square().mean()]))
        count = len(confidence) * ssl_dist.world_size()
        self.confidence_mean.mul_(self.momentum).add_(moments[0], alpha=1 - self.momentum)
        if count > 1:  # the unbiased variance needs two images
            variance = (moments[1] - moments[0].square()).clamp_min(0.0) * (count / (count - 1))
            self.confidence_variance.mul_(self.momentum).add_(variance, alpha=1 - self.momentum)

    def decide(self, probs: torch.Tensor, index: torch.Tensor | None) -> PseudoLabels:
        confidence, labels = probs.max(dim=1)
        below_mean = (confidence - self.confidence_mean).clamp(max=0.0)  # 0 at or above mu_t: weight 1
        width_squared = (self.confidence_variance / self.num_sigmas**2).clamp_min(1e-12)
        weights = self.max_weight * torch.exp(-below_mean.square() / (2 * width_squared))
        if len(weights):
            self.last_mean_weight.copy_(weights.mean())
        return PseudoLabels(labels, weights)

    def log_values(self) -> dict[str, torch.Tensor]:
        return {
            "confidence_mean": self.confidence_mean.clone(),
            "confidence_std": self.confidence_variance.sqrt(),
            "mean_weight": self.last_mean_weight.clone(),
        }

    def extra_repr(self) -> str:
        return (
            f"momentum={self.momentum}, num_sigmas={self.num_sigmas}, max_weight={self.max_weight}, "
            f"uniform_alignment={self.uniform_alignment}"
        )
