"""Contrastive and joint-embedding losses (plain ``nn.Module``s, no Lightning).

Each loss is computed in float32 (autocast off) because its softmax / normalisation is
sensitive to bf16 rounding. Losses that need the global batch under DDP gather it
themselves with ``ssl_modules.dist.gather`` (identity in one process).

- [0] SimCLR, Chen et al., 2020, https://arxiv.org/abs/2002.05709
- [1] MoCo, He et al., 2020, https://arxiv.org/abs/1911.05722
- [2] MoCo v2, Chen et al., 2020, https://arxiv.org/abs/2003.04297
- [3] BYOL, Grill et al., 2020, https://arxiv.org/abs/2006.07733
- [4] Barlow Twins, Zbontar et al., 2021, https://arxiv.org/abs/2103.03230
- [5] Alignment and uniformity, Wang & Isola, 2020, https://arxiv.org/abs/2005.10242
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ssl_modules import dist


def _check_pair(z_a: torch.Tensor, z_b: torch.Tensor) -> None:
    if z_a.ndim != 2 or z_a.shape != z_b.shape:
        raise ValueError(
            f"expected two embeddings of the same shape (batch_size, dim); got {tuple(z_a.shape)} and {tuple(z_b.shape)}"
        )


def _check_temperature(temperature: float) -> None:
    if temperature < 1e-4:
        raise ValueError(f"temperature must be >= 1e-4 (logits overflow below); got {temperature}")


class NTXentLoss(nn.Module):
    """NT-Xent: normalised-temperature cross-entropy over the 2N views of a batch.

    For every view i with positive j(i) (the other view of the same image)::

        l_i = -log exp(sim(z_i, z_j(i)) / t) / sum_{k != i} exp(sim(z_i, z_k) / t)

    averaged over all 2N views, ``sim`` the cosine similarity. Under DDP the N is the global
    batch: each rank's views are compared with the views of every rank (gathered with
    gradients), so the negatives are the same as in one process.

    - [0] SimCLR, Chen et al., 2020, https://arxiv.org/abs/2002.05709

    Args:
        temperature: t. 0.5 is the paper's choice for CIFAR-10 (appendix B.9); 0.1 for ImageNet.
        gather_distributed: use the views of all ranks as negatives under DDP.

    Shape: z_a, z_b (batch_size, dim), row k of both from the same image; returns a scalar.
    """

    def __init__(self, temperature: float = 0.5, gather_distributed: bool = True) -> None:
        super().__init__()
        _check_temperature(temperature)
        self.temperature = temperature
        self.gather_distributed = gather_distributed

    def forward(self, z_a: torch.Tensor, z_b: torch.Tensor) -> torch.Tensor:
        _check_pair(z_a, z_b)
        with torch.autocast(device_type=z_a.device.type, enabled=False):
            z_a = F.normalize(z_a.float(), dim=1)
            z_b = F.normalize(z_b.float(), dim=1)
            n = z_a.shape[0]
            if self.gather_distributed and dist.is_distributed():
                all_a, all_b = dist.gather(z_a), dist.gather(z_b)
                offset = dist.rank() * n
            else:
                all_a, all_b, offset = z_a, z_b, 0
            total = all_a.shape[0]
            queries = torch.cat([z_a, z_b])  # (2n, dim): this rank's views
            keys = torch.cat([all_a, all_b])  # (2N, dim): every rank's views
            logits = queries @ keys.T / self.temperature  # (2n, 2N)
            local = torch.arange(n, device=z_a.device) + offset  # global index of our images
            self_index = torch.cat([local, local + total])  # column of each query itself
            positive_index = torch.cat([local + total, local])  # column of its other view
            rows = torch.arange(2 * n, device=z_a.device)
            is_self = torch.zeros_like(logits, dtype=torch.bool)
            is_self[rows, self_index] = True
            logits = logits.masked_fill(is_self, float("-inf"))  # the sum runs over k != i
            return F.cross_entropy(logits, positive_index)


class InfoNCELoss(nn.Module):
    """MoCo's InfoNCE: each query against its key (positive) and a queue of negatives::

        l = -log exp(q.k+ / t) / (exp(q.k+ / t) + sum_{k- in queue} exp(q.k- / t))

    averaged over the queries; q, k and the queue are L2-normalised. The key and the queue
    come from the momentum encoder: compute them under ``torch.no_grad()`` in the method.

    - [1] MoCo, He et al., 2020, https://arxiv.org/abs/1911.05722
    - [2] MoCo v2, Chen et al., 2020, https://arxiv.org/abs/2003.04297

    Args:
        temperature: t (MoCo v2: 0.2).

    Shape: query, key (batch_size, dim); queue (queue_size, dim); returns a scalar.
    """

    def __init__(self, temperature: float = 0.2) -> None:
        super().__init__()
        _check_temperature(temperature)
        self.temperature = temperature

    def forward(self, query: torch.Tensor, key: torch.Tensor, queue: torch.Tensor) -> torch.Tensor:
        _check_pair(query, key)
        if queue.ndim != 2 or queue.shape[1] != query.shape[1]:
            raise ValueError(
                f"queue must have shape (queue_size, {query.shape[1]}); got {tuple(queue.shape)}"
            )
        with torch.autocast(device_type=query.device.type, enabled=False):
            query = F.normalize(query.float(), dim=1)
            key = F.normalize(key.float(), dim=1)
            queue = F.normalize(queue.float(), dim=1)
            positive = (query * key).sum(dim=1, keepdim=True)  # (batch_size, 1)
            negative = query @ queue.T  # (batch_size, queue_size)
            logits = torch.cat([positive, negative], dim=1) / self.temperature
            targets = torch.zeros(len(query), dtype=torch.long, device=query.device)  # positive at column 0
            return F.cross_entropy(logits, targets)


class BYOLLoss(nn.Module):
    """BYOL's normalised mean squared error ``|p/|p| - z/|z||^2 = 2 - 2 cos(p, z)``, batch mean.

    The target ``z`` must come from the momentum network under ``torch.no_grad()`` (the
    stop-gradient lives in the method, not here); symmetrise by calling it twice with the views swapped.

    - [3] BYOL, Grill et al., 2020, https://arxiv.org/abs/2006.07733

    Shape: prediction, target (batch_size, dim); returns a scalar.
    """

    def forward(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        _check_pair(prediction, target)
        with torch.autocast(device_type=prediction.device.type, enabled=False):
            cosine = F.cosine_similarity(prediction.float(), target.float(), dim=1)  # (batch_size,)
            return (2 - 2 * cosine).mean()


class BarlowTwinsLoss(nn.Module):
    """Barlow Twins: push the cross-correlation of two views' embeddings to the identity::

        C_ij = sum_b za_bi zb_bj / N   (za, zb standardised over the batch)
        L = sum_i (1 - C_ii)^2 + lambda * sum_i sum_{j != i} C_ij^2

    Under DDP the embeddings of all ranks are gathered with gradients, so the batch
    statistics and C are those of the global batch and every rank holds the full loss; with
    the gather's summed backward and DDP's averaging, the gradient equals the one-process one.

    - [4] Barlow Twins, Zbontar et al., 2021, https://arxiv.org/abs/2103.03230

    Args:
        redundancy_weight: lambda, the weight of the off-diagonal (redundancy) term.
        gather_distributed: use the global batch under DDP.
        eps: added to the variance when standardising.

    Shape: z_a, z_b (batch_size, dim), batch_size >= 2; returns a scalar.
    """

    def __init__(
        self, redundancy_weight: float = 0.0051, gather_distributed: bool = True, eps: float = 1e-5
    ) -> None:
        super().__init__()
        if redundancy_weight < 0:
            raise ValueError(f"redundancy_weight must be >= 0; got {redundancy_weight}")
        self.redundancy_weight = redundancy_weight
        self.gather_distributed = gather_distributed
        self.eps = eps

    def forward(self, z_a: torch.Tensor, z_b: torch.Tensor) -> torch.Tensor:
        _check_pair(z_a, z_b)
        with torch.autocast(device_type=z_a.device.type, enabled=False):
            z_a, z_b = z_a.float(), z_b.float()
            if self.gather_distributed and dist.is_distributed():
                z_a, z_b = dist.gather(z_a), dist.gather(z_b)
            batch_size = z_a.shape[0]
            if batch_size < 2:
                raise ValueError("Barlow Twins needs a batch of at least 2 to standardise over it")
            # BatchNorm1d(affine=False) in training mode: biased variance
            z_a = (z_a - z_a.mean(0)) / torch.sqrt(z_a.var(0, unbiased=False) + self.eps)
            z_b = (z_b - z_b.mean(0)) / torch.sqrt(z_b.var(0, unbiased=False) + self.eps)
            correlation = z_a.T @ z_b / batch_size  # (dim, dim)
            on_diagonal = (torch.diagonal(correlation) - 1).pow(2).sum()
            off_diagonal = correlation.pow(2).sum() - torch.diagonal(correlation).pow(2).sum()
            return on_diagonal + self.redundancy_weight * off_diagonal


def alignment(z_a: torch.Tensor, z_b: torch.Tensor, alpha: float = 2.0) -> torch.Tensor:
    """Mean ``|f(x) - f(y)|^alpha`` over positive pairs of L2-normalised embeddings (lower: better aligned).

    - [5] Alignment and uniformity, Wang & Isola, 2020, https://arxiv.org/abs/2005.10242

    Shape: z_a, z_b (batch_size, dim); returns a scalar.
    """
    _check_pair(z_a, z_b)
    z_a, z_b = F.normalize(z_a.float(), dim=1), F.normalize(z_b.float(), dim=1)
    return (z_a - z_b).norm(dim=1).pow(alpha).mean()


def uniformity(z: torch.Tensor, t: float = 2.0) -> torch.Tensor:
    """``log mean exp(-t |f(x) - f(y)|^2)`` over distinct pairs of L2-normalised embeddings (lower: more uniform).

    - [5] Alignment and uniformity, Wang & Isola, 2020, https://arxiv.org/abs/2005.10242

    Shape: z (batch_size, dim), batch_size >= 2; returns a scalar.
    """
    if z.ndim != 2 or z.shape[0] < 2:
        raise ValueError(f"expected embeddings of shape (batch_size >= 2, dim); got {tuple(z.shape)}")
    z = F.normalize(z.float(), dim=1)
    return torch.pdist(z, p=2).pow(2).mul(-t).exp().mean().log()
