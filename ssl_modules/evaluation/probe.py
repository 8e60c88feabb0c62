"""Offline linear probe: a logistic regression on frozen features of the labeled split."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn


@torch.no_grad()
def extract_features(
    embed: Callable[[torch.Tensor], torch.Tensor],
    batches: Iterable,
    device: torch.device,
    to_float: Callable[[torch.Tensor], torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Features and labels of every batch (``LabeledBatch`` or ``(images, labels)``); returns (N, dim), (N,)."""
    features, labels = [], []
    for batch in batches:
        images, targets = batch[0], batch[1]
        features.append(embed(to_float(images.to(device))).float())
        labels.append(targets.to(device))
    return torch.cat(features), torch.cat(labels)


class LinearProbe(nn.Module):
    """Standardise features with the training statistics, then a linear layer.

    Shape: (batch_size, dim) -> (batch_size, num_classes).
    """

    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__()
        self.register_buffer("feature_mean", torch.zeros(dim))
        self.register_buffer("feature_std", torch.ones(dim))
        self.linear = nn.Linear(dim, num_classes)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear((features - self.feature_mean) / self.feature_std)


def fit_linear_probe(
    features: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    weight_decay: float = 1e-3,
    max_iter: int = 300,
) -> LinearProbe:
    """Multinomial logistic regression, full batch, L-BFGS, L2 penalty ``weight_decay``.

    Deterministic for given features, so ``test/acc`` does not depend on probe SGD noise.

    Args:
        features: Shape: (num_labeled, dim).
        labels: Shape: (num_labeled,), int64.
    """
    # Trainer.test runs hooks under torch.inference_mode, where enable_grad alone does not
    # allow autograd: leave it, and clone the (inference) features into normal tensors.
    with torch.inference_mode(False), torch.enable_grad():
        return _fit_linear_probe(
            features.detach().float().clone(), labels.clone(), num_classes, weight_decay, max_iter
        )


def _fit_linear_probe(
    features: torch.Tensor, labels: torch.Tensor, num_classes: int, weight_decay: float, max_iter: int
) -> LinearProbe:
    probe = LinearProbe(features.shape[1], num_classes).to(features.device)
    with torch.no_grad():
        probe.feature_mean.copy_(features.mean(0))
        probe.feature_std.copy_(features.std(0, unbiased=False).clamp_min(1e-6))
        probe.linear.weight.zero_()
        probe.linear.bias.zero_()
    optimizer = torch.optim.LBFGS(
        probe.linear.parameters(), lr=1.0, max_iter=max_iter, history_size=20, line_search_fn="strong_wolfe"
    )

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(probe(features), labels) + weight_decay * probe.linear.weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return probe.requires_grad_(False)
