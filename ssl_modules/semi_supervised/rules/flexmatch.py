"""FlexMatch's rule: curriculum per-class thresholds from each unlabeled image's learning status."""

from __future__ import annotations

from typing import Any

import torch

from ssl_modules import dist as ssl_dist
from ssl_modules.semi_supervised.rules.base import (
    DistributionAlignment,
    PseudoLabelRule,
    PseudoLabels,
    _check_unit,
)

MAPPINGS = ("convex", "linear")


class FlexMatchThreshold(PseudoLabelRule):
    """Curriculum Pseudo Labeling: per-class thresholds ``T(c) = M(beta(c)) * tau`` that rise as
    a class is learnt.

    Every unlabeled image ``n`` (``index`` in the unlabeled set) has a learning status
    ``u_n``: the class it was last predicted with confidence ``max q >= tau``, or -1 while it
    never was (``status``, a buffer of ``num_samples`` entries). The learning effect of class
    ``c`` is ``sigma(c) = #{n : u_n = c}``, normalised to ``beta(c) = sigma(c) / max_c' sigma(c')``,
    or, with threshold warm-up, ``beta(c) = sigma(c) / max(max_c' sigma(c'), #{n : u_n = -1})``
    (while most images are unused the thresholds start low and rise together). The mapping is
    ``M(x) = x / (2 - x)`` (``"convex"``, the paper's choice) or ``M(x) = x`` (``"linear"``).
    The pseudo-label is ``argmax q`` with weight ``1(max q >= T(argmax q))``.

    Order within a training batch, as in the paper's Algorithm 1 (and TorchSSL / USB): the
    thresholds come from the status before the batch; then the status of the batch's images is set
    to ``argmax q`` where ``max q >= tau`` and kept where not (an image keeps its last confident
    prediction; the paper writes ``>``, the official code and this rule ``>=``, as FixMatch's mask).
    Under DDP every rank gathers the ``(index, argmax q, max q)`` of the global batch before
    writing, so all ranks hold the same status. Before any confident prediction every ``beta`` is
    0 and so is every threshold (everything passes).

    The status is checkpointed (``state_dict``) and loads into a fresh, unallocated rule, so a
    resumed run continues exactly. It needs the size of the unlabeled set: ``FixMatchModule``
    calls ``allocate(num_classes, num_samples)`` with it when fitting starts (the library's
    datamodules serve it); without it the first training batch raises.

    - [0] FlexMatch, Zhang et al., 2021, https://arxiv.org/abs/2110.08263
    - [1] USB (the reference implementation), Wang et al., 2022, https://arxiv.org/abs/2208.07204

    Args:
        threshold: ``tau`` in [0, 1] (0.95), the highest per-class threshold and the confidence
            that marks an image as learnt.
        warmup: threshold warm-up (True): normalise by ``max(max_c sigma(c), unused)``.
        mapping: ``"convex"`` (``x / (2 - x)``, default) or ``"linear"`` (``x``).
        alignment: optional ``DistributionAlignment``.

    Shapes: ``probs`` (batch_size, num_classes); ``index`` (batch_size,) int64 in
    ``[0, num_samples)``; ``status`` (num_samples,) int64 in ``[-1, num_classes)``.
    """

    def __init__(
        self,
        threshold: float = 0.95,
        warmup: bool = True,
        mapping: str = "convex",
        alignment: DistributionAlignment | None = None,
    ) -> None:
        super().__init__(alignment)
        _check_unit("threshold", threshold)
        if mapping not in MAPPINGS:
            raise ValueError(f"mapping must be one of {MAPPINGS}; got {mapping!r}")
        self.threshold = threshold
        self.warmup = warmup
        self.mapping = mapping
        self.register_buffer("status", torch.zeros(0, dtype=torch.long))
        # the thresholds of the status before this training batch, taken by ``update`` for ``decide``
        self._batch_thresholds: torch.Tensor | None = None

    def allocate(self, num_classes: int, num_samples: int | None = None) -> None:
        super().allocate(num_classes, num_samples)
        if num_samples is not None and self.status.numel() != num_samples:
            self.status = torch.full((num_samples,), -1, dtype=torch.long, device=self.status.device)

    # -- the state -----------------------------------------------------------------------------
    def _counts(self) -> torch.Tensor:
        """``[#unused, sigma(0), ..., sigma(C - 1)]``. Shape: (num_classes + 1,)."""
        assert self.num_classes is not None
        return torch.bincount(self.status + 1, minlength=self.num_classes + 1)

    def class_thresholds(self) -> torch.Tensor:
        """``T(c) = M(beta(c)) * tau`` of the current status. Shape: (num_classes,)."""
        counts = self._counts().float()
        unused, learning_effect = counts[0], counts[1:]  # learning_effect: sigma, (num_classes,)
        normaliser = learning_effect.max()
        if self.warmup:
            normaliser = torch.maximum(normaliser, unused)
        beta = learning_effect / normaliser.clamp_min(1.0)  # 0 / 0 (nothing learnt yet) -> 0
        mapped = beta / (2.0 - beta) if self.mapping == "convex" else beta
        return mapped * self.threshold

    def update(self, probs: torch.Tensor, index: torch.Tensor | None) -> None:
        if index is None:
            raise ValueError(
                "FlexMatchThreshold keys its learning status on the images' index in the unlabeled set; "
                "pass index (the batch's unlabeled.index, ssl_modules.batch)."
            )
        if self.status.numel() == 0:
            raise ValueError(
                "FlexMatchThreshold keeps a learning status per unlabeled image and needs the size of the "
                "unlabeled set: use a datamodule of the library (it serves the unlabeled dataset), or call "
                "rule.allocate(num_classes, num_unlabeled_images) before training."
            )
        if (
            index.device.type == "cpu"
            and len(index)
            and not 0 <= int(index.min()) <= int(index.max()) < len(self.status)
        ):
            raise ValueError(
                f"index must lie in [0, {len(self.status)}) (the unlabeled set allocated); got "
                f"[{int(index.min())}, {int(index.max())}]. Allocate the rule with the unlabeled set's size."
            )
        self._batch_thresholds = self.class_thresholds()
        confidence, predictions = probs.max(dim=1)
        # the global batch: every rank writes the same entries
        index = ssl_dist.gather_no_grad(index.to(self.status.device))
        predictions = ssl_dist.gather_no_grad(predictions)
        confidence = ssl_dist.gather_no_grad(confidence)
        # without boolean indexing (a host synchronisation): unconfident images keep their status
        confident = confidence >= self.threshold
        self.status[index] = torch.where(confident, predictions, self.status[index])

    def decide(self, probs: torch.Tensor, index: torch.Tensor | None) -> PseudoLabels:
        thresholds = self._batch_thresholds
        self._batch_thresholds = None
        if thresholds is None:  # no update before this decision (evaluation mode, a direct call)
            thresholds = self.class_thresholds()
        confidence, labels = probs.max(dim=1)
        return PseudoLabels(labels, (confidence >= thresholds[labels]).float())

    def log_values(self) -> dict[str, torch.Tensor]:
        """Per-class thresholds (``threshold/c{k}``) and the unused fraction of the status,
        after this batch's update (what the next batch uses)."""
        if self.num_classes is None or self.status.numel() == 0:
            return {}
        values = {f"threshold/c{k}": value for k, value in enumerate(self.class_thresholds())}
        values["unused_fraction"] = self._counts()[0].float() / self.status.numel()
        return values

    def _load_from_state_dict(
        self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any
    ) -> None:
        saved = state_dict.get(prefix + "status")
        if saved is not None and saved.shape != self.status.shape:
            if self.status.numel() != 0:
                raise ValueError(
                    f"the checkpoint's FlexMatch status covers {saved.numel()} unlabeled images but this rule "
                    f"was allocated for {self.status.numel()}: the unlabeled set differs from the checkpoint's."
                )
            self.status = torch.empty_like(saved, device=self.status.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
