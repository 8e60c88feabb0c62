"""FreeMatch's rule: self-adaptive global and per-class thresholds, and the self-adaptive fairness loss."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ssl_modules.semi_supervised.rules.base import (
    DistributionAlignment,
    PseudoLabelRule,
    PseudoLabels,
    _check_unit,
    global_mean,
)

_BUFFERS = ("global_threshold", "class_probs", "label_histogram")


def _inverse_or_zero(values: torch.Tensor) -> torch.Tensor:
    """``1 / x`` where ``x > 0``, 0 where ``x = 0`` (a class nobody predicts drops out)."""
    return torch.where(values > 0, 1.0 / values.clamp_min(1e-12), torch.zeros_like(values))


class FreeMatchThreshold(PseudoLabelRule):
    """Self-adaptive thresholding (SAT) with the self-adaptive fairness loss (SAF).

    Each training batch (the global batch under DDP) moves three EMAs with momentum
    ``lambda`` (all start at ``1/C``):

    - the global threshold ``tau_t = lambda tau_{t-1} + (1 - lambda) mean_b max_c q_b(c)``,
    - the local (class) estimate ``p_t = lambda p_{t-1} + (1 - lambda) mean_b q_b``,
    - the histogram of the weak-view predictions ``h_t = lambda h_{t-1} + (1 - lambda) hist(argmax q)``;

    the per-class threshold is ``tau_t(c) = p_t(c) / max_c' p_t(c') * tau_t`` (MaxNorm), and the
    pseudo-label ``argmax q`` has weight ``1(max q >= tau_t(argmax q))``. The statistics of one
    batch are updated before its decisions, as in the paper's Algorithm 1.

    ``extra_loss`` is the fairness term ``w_f * L_f`` on the strong views of the kept images
    (``S``: weight > 0), with ``p_bar = mean_{b in S} softmax(strong_b)`` and ``h_bar`` the
    normalised histogram of their ``argmax``:
    ``L_f = -H(SumNorm(p_t / h_t), SumNorm(p_bar / h_bar)) = sum_c a_c log(b_c)``, where the
    ``1/h`` factors carry no gradient and are 0 for a class of empty histogram. ``L_f`` is
    negative (minimising it maximises the cross-entropy: it pushes the strong views' mean
    prediction towards diversity; see the authors' answer in
    https://github.com/microsoft/Semi-supervised-learning/issues/182). It is 0 when no image is
    kept. The term is computed on this rank's batch (as in USB); the EMAs are global.

    ``FixMatchModule`` adds ``extra_loss`` to the unlabeled loss, which ``unlabeled_loss_weight``
    (``w_u``, 1 in the paper) multiplies: the paper's ``L = L_s + w_u L_u + w_f L_f`` with ``w_u = 1``.

    - [0] FreeMatch, Wang et al., 2023, https://arxiv.org/abs/2205.07246
    - [1] USB (the reference implementation), Wang et al., 2022, https://arxiv.org/abs/2208.07204

    Args:
        momentum: EMA momentum ``lambda`` in [0, 1] (0.999).
        fairness_weight: ``w_f`` >= 0 (0.001, ``ent_loss_ratio`` of USB's configs for CIFAR-10 40 /
            250 / 4000 and CIFAR-100 400, ``config/classic_cv/freematch/``); 0 turns the term off.
        alignment: optional ``DistributionAlignment``.

    Shapes: ``probs`` (batch_size, num_classes); buffers ``global_threshold`` (), ``class_probs``
    (num_classes,), ``label_histogram`` (num_classes,).
    """

    def __init__(
        self,
        momentum: float = 0.999,
        fairness_weight: float = 0.001,
        alignment: DistributionAlignment | None = None,
    ) -> None:
        super().__init__(alignment)
        _check_unit("momentum", momentum)
        if fairness_weight < 0:
            raise ValueError(
                f"fairness_weight must be >= 0 (0 turns the fairness loss off); got {fairness_weight}"
            )
        self.momentum = momentum
        self.fairness_weight = fairness_weight
        for name in _BUFFERS:
            self.register_buffer(name, torch.zeros(0))

    def allocate(self, num_classes: int, num_samples: int | None = None) -> None:
        super().allocate(num_classes, num_samples)
        if self.class_probs.numel() != num_classes:
            device = self.class_probs.device
            self.global_threshold = torch.tensor(1.0 / num_classes, device=device)
            self.class_probs = torch.full((num_classes,), 1.0 / num_classes, device=device)
            self.label_histogram = torch.full((num_classes,), 1.0 / num_classes, device=device)

    def class_thresholds(self) -> torch.Tensor:
        """``tau_t(c) = MaxNorm(p_t)(c) * tau_t``. Shape: (num_classes,)."""
        return self.class_probs / self.class_probs.max() * self.global_threshold

    def update(self, probs: torch.Tensor, index: torch.Tensor | None) -> None:
        confidence, predictions = probs.max(dim=1)
        histogram = F.one_hot(predictions, probs.shape[1]).float().mean(dim=0)  # (num_classes,), sums to 1
        # every rank passes a batch of the same size: the mean of the ranks' means is the global mean
        keep, new = self.momentum, 1.0 - self.momentum
        self.global_threshold.mul_(keep).add_(global_mean(confidence.mean()), alpha=new)
        self.class_probs.mul_(keep).add_(global_mean(probs.mean(dim=0)), alpha=new)
        self.label_histogram.mul_(keep).add_(global_mean(histogram), alpha=new)

    def decide(self, probs: torch.Tensor, index: torch.Tensor | None) -> PseudoLabels:
        confidence, labels = probs.max(dim=1)
        return PseudoLabels(labels, (confidence >= self.class_thresholds()[labels]).float())

    def extra_loss(self, strong_logits: torch.Tensor, pseudo: PseudoLabels) -> torch.Tensor | None:
        """``w_f * L_f`` (see the class docstring). Shape: strong_logits (batch_size, num_classes) -> ()."""
        if self.fairness_weight == 0:
            return None
        kept = (pseudo.weights > 0).float()  # (U,)
        num_kept = kept.sum()
        strong_probs = strong_logits.float().softmax(dim=1)  # (U, C), carries the gradient
        # means over the kept images, without a host synchronisation (an empty set gives zeros)
        mean_probs = (kept[:, None] * strong_probs).sum(dim=0) / num_kept.clamp_min(1.0)  # p_bar: (C,)
        with torch.no_grad():
            predictions = F.one_hot(strong_probs.argmax(dim=1), strong_probs.shape[1]).float()
            strong_histogram = (kept[:, None] * predictions).sum(dim=0) / num_kept.clamp_min(1.0)  # h_bar
            target = self.class_probs * _inverse_or_zero(self.label_histogram)
            target = target / target.sum().clamp_min(1e-12)  # SumNorm(p_t / h_t)
        modulated = mean_probs * _inverse_or_zero(strong_histogram)
        modulated = modulated / modulated.sum().clamp_min(1e-12)  # SumNorm(p_bar / h_bar)
        fairness = (target * torch.log(modulated + 1e-12)).sum()  # -H(target, modulated)
        return self.fairness_weight * fairness * (num_kept > 0).float()

    def log_values(self) -> dict[str, torch.Tensor]:
        """The global threshold ``tau_t`` (``global_threshold``) and ``threshold/c{k}``."""
        if self.class_probs.numel() == 0:
            return {}
        values = {"global_threshold": self.global_threshold.clone()}
        values.update({f"threshold/c{k}": value for k, value in enumerate(self.class_thresholds())})
        return values

    def _load_from_state_dict(
        self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any
    ) -> None:
        for name in _BUFFERS:
            saved = state_dict.get(prefix + name)
            current = getattr(self, name)
            if saved is not None and saved.shape != current.shape:
                setattr(self, name, torch.empty_like(saved, device=current.device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
