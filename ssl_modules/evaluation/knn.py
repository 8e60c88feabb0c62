"""Weighted k-nearest-neighbour classification of features, the usual cheap SSL monitor.

- [0] Instance Discrimination, Wu et al., 2018, https://arxiv.org/abs/1805.01978
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def knn_predict(
    query: torch.Tensor,
    bank: torch.Tensor,
    bank_labels: torch.Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
) -> torch.Tensor:
    """Class scores of ``query`` from its ``k`` most cosine-similar ``bank`` features.

    Each neighbour votes for its class with weight ``exp(similarity / temperature)``.

    Args:
        query: Shape: (num_query, dim).
        bank: Shape: (num_bank, dim).
        bank_labels: Shape: (num_bank,), int64.

    Returns:
        Shape: (num_query, num_classes).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0; got {temperature}")
    k = min(k, len(bank))
    similarity = F.normalize(query, dim=1) @ F.normalize(bank, dim=1).T  # (num_query, num_bank)
    top_similarity, top_index = similarity.topk(k, dim=1)  # (num_query, k)
    weights = (top_similarity / temperature).exp()
    votes = torch.zeros(len(query), num_classes, device=query.device, dtype=weights.dtype)
    votes.scatter_add_(1, bank_labels[top_index], weights)
    return votes
