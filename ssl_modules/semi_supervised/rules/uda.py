"""UDA's rule (confidence mask, sharpened soft targets) and its training-signal annealing.

- [0] UDA, Xie et al., 2020, https://arxiv.org/abs/1904.12848
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ssl_modules.semi_supervised.rules.base import (
    DistributionAlignment,
    PseudoLabelRule,
    PseudoLabels,
    _check_unit,
)

TSA_SCHEDULES = ("linear", "log", "exp")


class UDAConsistency(PseudoLabelRule):
    """UDA's unlabeled targets: the weak-view prediction sharpened with a softmax temperature,
    taught where the prediction is confident.

    Target ``softmax(logits / temperature) = normalize(q^(1 / temperature))`` (a soft target),
    weight ``1(max q >= threshold)``; with the module's cross-entropy this is UDA's consistency
    ``KL(sharpened q || p(strong))`` up to the target's entropy, which has no gradient. Stateless
    (an optional ``alignment`` composes as with any rule).

    - [0] UDA, Xie et al., 2020, https://arxiv.org/abs/1904.12848 (Sec. 3.2: confidence-based
      masking, softmax temperature control)

    Args:
        threshold: confidence ``beta`` in [0, 1] below which an image is masked out (0.8).
        temperature: sharpening temperature ``tau > 0`` of the targets (0.4; 1: no sharpening).
        alignment: optional ``DistributionAlignment`` applied to ``q`` first.

    Shape: probs (batch_size, num_classes) -> targets (batch_size, num_classes), weights (batch_size,).
    """

    def __init__(
        self,
        threshold: float = 0.8,
        temperature: float = 0.4,
        alignment: DistributionAlignment | None = None,
    ) -> None:
        super().__init__(alignment)
        _check_unit("threshold", threshold)
        if not (temperature > 0 and math.isfinite(temperature)):
            raise ValueError(
                f"temperature must be a finite number > 0 (UDA: 0.4; 1: no sharpening); got {temperature}"
            )
        self.threshold = threshold
        self.temperature = temperature

    def decide(self, probs: torch.Tensor, index: torch.Tensor | None) -> PseudoLabels:
        confidence = probs.max(dim=1).values
        # log q = logits - logsumexp(logits): softmax(log q / T) = softmax(logits / T); q = 0 -> 0
        sharpened = torch.softmax(probs.log() / self.temperature, dim=1)  # (U, num_classes)
        return PseudoLabels(sharpened, (confidence >= self.threshold).float())

    def log_values(self) -> dict[str, torch.Tensor]:
        return {"threshold": torch.tensor(float(self.threshold))}


def check_tsa_schedule(schedule: str | None) -> None:
    """Refuse an unknown training-signal-annealing schedule (None: off)."""
    if schedule is not None and schedule not in TSA_SCHEDULES:
        raise ValueError(
            f"tsa must be one of {TSA_SCHEDULES} (UDA's training-signal annealing) or None (null in YAML) "
            f"to turn it off; got {schedule!r}"
        )


def tsa_threshold(schedule: str, progress: float, num_classes: int) -> float:
    """UDA's training-signal-annealing threshold ``eta_t = alpha_t (1 - 1/K) + 1/K``.

    ``alpha_t`` at training progress ``t`` (step / total steps, clipped to [0, 1]): ``"linear"``
    ``t``; ``"log"`` ``1 - exp(-5 t)`` (releases the labeled signal early); ``"exp"``
    ``exp(5 (t - 1))`` (releases it late: for few labels, where the model overfits them fast).
    A pure function of the step, so a resumed run continues exactly.

    - [0] UDA, Xie et al., 2020, https://arxiv.org/abs/1904.12848 (Sec. 3.2, training signal annealing)
    """
    check_tsa_schedule(schedule)
    if num_classes < 2:
        raise ValueError(f"training-signal annealing needs num_classes >= 2; got {num_classes}")
    progress = min(1.0, max(0.0, float(progress)))
    if schedule == "linear":
        alpha = progress
    elif schedule == "log":
        alpha = 1.0 - math.exp(-5.0 * progress)
    else:
        alpha = math.exp(5.0 * (progress - 1.0))
    return alpha * (1.0 - 1.0 / num_classes) + 1.0 / num_classes


def annealed_cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, threshold: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """UDA's annealed supervised loss: cross-entropy over the labeled images whose probability
    of the correct class is at most ``threshold``, ``sum_kept CE / max(1, #kept)``; the others
    are dropped (no loss, no gradient) so that the few labels are not memorised early.

    As UDA's reference code (``anneal_sup_loss``), which drops ``p(y) > eta_t`` and averages over
    the kept images. (USB's UDA thresholds the largest probability and averages over the batch.)

    - [0] UDA, Xie et al., 2020, https://arxiv.org/abs/1904.12848

    Args:
        logits: Shape: (batch_size, num_classes); carries the gradient.
        labels: Shape: (batch_size,), int64.
        threshold: ``eta_t`` (``tsa_threshold``).

    Returns: ``(loss, kept)``, a scalar and the float mask of kept images, shape (batch_size,).
    """
    if logits.ndim != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(
            f"expected logits (batch_size, num_classes) and labels (batch_size,); got "
            f"{tuple(logits.shape)} and {tuple(labels.shape)}"
        )
    per_image = F.cross_entropy(logits.float(), labels, reduction="none")
    with torch.no_grad():  # the mask is a choice of images, not a function to differentiate
        kept = (torch.exp(-per_image) <= threshold).float()  # exp(-CE) = p(correct class)
    return (per_image * kept).sum() / kept.sum().clamp_min(1.0), kept
