"""Non-contrastive joint-embedding losses: VICReg and SimSiam's negative cosine similarity
(plain ``nn.Module``s, no Lightning).

Computed in float32 (autocast off): standard deviations, covariances and normalisations lose
too much in bf16.

- [0] VICReg, Bardes et al., 2022, https://arxiv.org/abs/2105.04906
- [1] SimSiam, Chen & He, 2021, https://arxiv.org/abs/2011.10566
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ssl_modules import dist


def _check_pair(z_a: torch.Tensor, z_b: torch.Tensor) -> None:
    if z_a.ndim != 2 or z_a.shape != z_b.shape:
        raise ValueError(
            f"expected two embeddings of the same shape (batch_size, dim); got {tuple(z_a.shape)} and {tuple(z_b.shape)}"
        )


class VICRegTerms(NamedTuple):
    """The three unweighted VICReg terms (scalars): invariance s, variance v, covariance c."""

    invariance: torch.Tensor
    variance: torch.Tensor
    covariance: torch.Tensor


class VICRegLoss(nn.Module):
    """VICReg: invariance + variance + covariance regularisation of two views' embeddings.

    With ``Z``, ``Z'`` of shape (n, d) and per-dimension statistics over the batch::

        s(Z, Z') = 1/(n d) sum_i |z_i - z'_i|^2                      (mean squared error)
        v(Z)     = 1/d sum_j max(0, gamma - sqrt(Var(z^j) + eps))    (Var unbiased, gamma = 1)
        c(Z)     = 1/d sum_{i != j} C(Z)_ij^2,  C(Z) = (Z - mean)^T (Z - mean) / (n - 1)
        loss     = lambda s(Z, Z') + mu (v(Z) + v(Z')) / 2 + nu (c(Z) + c(Z'))

    The variance term averages the two branches, as in the authors' released code
    (facebookresearch/vicreg, ``main_vicreg.py``) and lightly's ``VICRegLoss``; the paper's
    eq. (6) writes their sum (the same loss with mu doubled). The defaults 25/25/1 are the
    paper's.

    Under DDP the variance and covariance terms use the embeddings of every rank (gathered
    with gradients, as the authors' code and solo-learn do): they are batch statistics, and a
    per-rank batch would make them noisier. The invariance term is a per-sample mean and stays
    on the rank's own rows; with the gather's summed backward and DDP's averaging, the
    gradient equals the one-process gradient of the global batch.

    - [0] VICReg, Bardes et al., 2022, https://arxiv.org/abs/2105.04906

    Args:
        invariance_weight: lambda (paper: 25).
        variance_weight: mu (paper: 25).
        covariance_weight: nu (paper: 1).
        variance_target: gamma, the standard deviation each dimension is pushed up to (paper: 1).
        eps: added to the variance under the square root (paper: 1e-4).
        gather_distributed: compute the variance and covariance terms on the global batch under DDP.

    Shape: z_a, z_b (batch_size, dim), row k of both from the same image, batch_size >= 2
    (over all ranks); returns a scalar.
    """

    def __init__(
        self,
        invariance_weight: float = 25.0,
        variance_weight: float = 25.0,
        covariance_weight: float = 1.0,
        variance_target: float = 1.0,
        eps: float = 1e-4,
        gather_distributed: bool = True,
    ) -> None:
        super().__init__()
        weights = {
            "invariance_weight": invariance_weight,
            "variance_weight": variance_weight,
            "covariance_weight": covariance_weight,
        }
        negative = {name: value for name, value in weights.items() if value < 0}
        if negative:
            raise ValueError(f"VICReg weights must be >= 0; got {negative}")
        if variance_target <= 0 or eps <= 0:
            raise ValueError(f"variance_target and eps must be > 0; got {variance_target}, {eps}")
        self.invariance_weight = invariance_weight
        self.variance_weight = variance_weight
        self.covariance_weight = covariance_weight
        self.variance_target = variance_target
        self.eps = eps
        self.gather_distributed = gather_distributed

    def _variance(self, z: torch.Tensor) -> torch.Tensor:
        std = torch.sqrt(z.var(dim=0) + self.eps)  # (dim,), unbiased
        return F.relu(self.variance_target - std).mean()

    @staticmethod
    def _covariance(z: torch.Tensor) -> torch.Tensor:
        n, dim = z.shape
        centred = z - z.mean(dim=0)
        covariance = centred.T @ centred / (n - 1)  # (dim, dim)
        diagonal = torch.eye(dim, dtype=torch.bool, device=z.device)
        return covariance.masked_fill(diagonal, 0).pow(2).sum() / dim

    def terms(self, z_a: torch.Tensor, z_b: torch.Tensor) -> VICRegTerms:
        """The unweighted terms ``(s(Z, Z'), (v(Z) + v(Z')) / 2, c(Z) + c(Z'))``."""
        _check_pair(z_a, z_b)
        with torch.autocast(device_type=z_a.device.type, enabled=False):
            z_a, z_b = z_a.float(), z_b.float()
            invariance = F.mse_loss(z_a, z_b)  # this rank's pairs
            if self.gather_distributed and dist.is_distributed():
                z_a, z_b = dist.gather(z_a), dist.gather(z_b)  # (world_size * n, dim)
            if z_a.shape[0] < 2:
                raise ValueError("VICReg needs a batch of at least 2 for its variance and covariance terms")
            variance = (self._variance(z_a) + self._variance(z_b)) / 2
            covariance = self._covariance(z_a) + self._covariance(z_b)
            return VICRegTerms(invariance, variance, covariance)

    def combine(self, terms: VICRegTerms) -> torch.Tensor:
        """``lambda s + mu v + nu c`` of the ``terms``."""
        return (
            self.invariance_weight * terms.invariance
            + self.variance_weight * terms.variance
            + self.covariance_weight * terms.covariance
        )

    def forward(self, z_a: torch.Tensor, z_b: torch.Tensor) -> torch.Tensor:
        return self.combine(self.terms(z_a, z_b))


class NegativeCosineSimilarity(nn.Module):
    """SimSiam's D: ``D(p, z) = -cos(p, z)``, averaged over the batch.

    The target ``z`` must be detached in the method (SimSiam's stop-gradient is *the* operation
    that keeps it from collapsing; it belongs where the reader sees it); symmetrise by calling
    it twice with the views swapped: ``(D(p1, z2) + D(p2, z1)) / 2``.

    - [1] SimSiam, Chen & He, 2021, https://arxiv.org/abs/2011.10566

    Args:
        eps: floor of the norms in the cosine.

    Shape: prediction, target (batch_size, dim); returns a scalar in [-1, 1].
    """

    def __init__(self, eps: float = 1e-8) -> None:
        super().__init__()
        if eps <= 0:
            raise ValueError(f"eps must be > 0; got {eps}")
        self.eps = eps

    def forward(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        _check_pair(prediction, target)
        with torch.autocast(device_type=prediction.device.type, enabled=False):
            prediction, target = prediction.float(), target.float()
            return -F.cosine_similarity(prediction, target, dim=1, eps=self.eps).mean()
