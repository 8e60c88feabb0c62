"""Losses of the colorization pretext task: quantised ab bins, soft-encoding, class rebalancing.

- [0] Colorization, Zhang et al., 2016, https://arxiv.org/abs/1603.08511

The ab plane is cut into squares of side ``grid_size`` (10 in the paper); only the bins that
sRGB colours can reach are kept (Zhang's 313; here computed from a dense sample of the sRGB
cube rounded to the nearest grid point, which gives 261 at ``grid_size=10``).
Plain functions and ``nn.Module``s: no Lightning.
"""

from __future__ import annotations

import functools

import kornia.color
import torch
import torch.nn.functional as F
from torch import nn


@functools.lru_cache(maxsize=4)
def _in_gamut_ab_bins(grid_size: float, samples_per_axis: int) -> torch.Tensor:
    axis = torch.linspace(0, 1, samples_per_axis)
    rgb = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij")).reshape(3, -1, 1)  # (3, n^3, 1)
    ab = kornia.color.rgb_to_lab(rgb)[1:].reshape(2, -1).T  # (n^3, 2)
    centres = torch.unique(torch.round(ab / grid_size), dim=0) * grid_size  # (Q, 2)
    return centres.contiguous()


def ab_bin_centres(grid_size: float = 10.0, samples_per_axis: int = 64) -> torch.Tensor:
    """Centres of the in-gamut ab bins: every multiple of ``grid_size`` that some sRGB colour
    rounds to. Shape: (num_bins, 2), float32; 313 bins in the paper, 261 here
    (nearest-grid-point rounding of a 64^3 sample of the sRGB cube)."""
    if grid_size <= 0:
        raise ValueError(f"grid_size must be > 0; got {grid_size}")
    return _in_gamut_ab_bins(float(grid_size), samples_per_axis).clone()


def _pixels(ab: torch.Tensor) -> torch.Tensor:
    return ab.permute(0, 2, 3, 1).reshape(-1, 2)  # (B*H*W, 2)


def soft_encode_ab(
    ab: torch.Tensor, centres: torch.Tensor, neighbours: int = 5, sigma: float = 5.0
) -> torch.Tensor:
    """Zhang's soft-encoding: the ``neighbours`` nearest bin centres of each pixel's ab value,
    weighted by a Gaussian of std ``sigma`` (in ab units) of the distance, normalised to sum 1.

    Args:
        ab: Shape: (batch_size, 2, H, W).
        centres: Shape: (num_bins, 2).

    Returns:
        Shape: (batch_size, num_bins, H, W); each pixel's distribution over bins.
    """
    if neighbours < 1 or sigma <= 0:
        raise ValueError(f"neighbours must be >= 1 and sigma > 0; got {neighbours}, {sigma}")
    batch_size, _, height, width = ab.shape
    distance = torch.cdist(_pixels(ab.float()), centres.float())  # (B*H*W, Q)
    near_distance, near_index = distance.topk(neighbours, dim=1, largest=False)  # (B*H*W, k)
    weights = torch.softmax(-near_distance.pow(2) / (2 * sigma**2), dim=1)
    encoded = torch.zeros_like(distance).scatter_(1, near_index, weights)  # (B*H*W, Q)
    return encoded.view(batch_size, height, width, -1).permute(0, 3, 1, 2)


def hard_encode_ab(ab: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """Index of the nearest bin centre. Shape: (batch_size, 2, H, W) -> (batch_size, H, W), int64."""
    batch_size, _, height, width = ab.shape
    return torch.cdist(_pixels(ab.float()), centres.float()).argmin(1).view(batch_size, height, width)


def rebalancing_weights(
    prior: torch.Tensor, centres: torch.Tensor, rebalance_lambda: float = 0.5, sigma: float = 5.0
) -> torch.Tensor:
    """Zhang's class-rebalancing weights ``w ∝ ((1 - λ) p̃ + λ / Q)^-1`` with ``E_p̃[w] = 1``.

    ``p̃`` is the empirical bin distribution ``prior`` smoothed with a Gaussian of std ``sigma``
    over the ab plane. ``λ = 1`` gives no rebalancing (all weights 1); ``λ = 0`` reweights by
    the inverse prior.

    Args:
        prior: Shape: (num_bins,), non-negative (normalised here).
        centres: Shape: (num_bins, 2).

    Returns:
        Shape: (num_bins,).
    """
    if not 0.0 <= rebalance_lambda <= 1.0:
        raise ValueError(f"rebalance_lambda must be in [0, 1]; got {rebalance_lambda}")
    prior = prior.float() / prior.float().sum().clamp_min(1e-12)
    kernel = torch.exp(-torch.cdist(centres.float(), centres.float()).pow(2) / (2 * sigma**2))  # (Q, Q)
    smoothed = kernel @ prior
    smoothed = smoothed / smoothed.sum()
    weights = 1.0 / ((1 - rebalance_lambda) * smoothed + rebalance_lambda / len(prior))
    return weights / (smoothed * weights).sum()


class ColorizationLoss(nn.Module):
    """Rebalanced multinomial cross-entropy over quantised ab bins (Zhang et al., eq. 2):

    ``L = -1/(H W) Σ_{h,w} v(Z_hw) Σ_q Z_hwq log Ẑ_hwq``, with ``Z`` the soft-encoded true
    colour and ``v(Z_hw) = w[argmax_q Z_hwq]`` the rebalancing weight of its bin.

    - [0] Colorization, Zhang et al., 2016, https://arxiv.org/abs/1603.08511

    Args:
        centres: bin centres. Shape: (num_bins, 2).
        neighbours: bins used by the soft-encoding (5 in the paper).
        sigma: Gaussian std of the soft-encoding and of the prior smoothing (5 in the paper).
        rebalance_lambda: mixing weight with the uniform distribution (0.5 in the paper).
    """

    def __init__(
        self, centres: torch.Tensor, neighbours: int = 5, sigma: float = 5.0, rebalance_lambda: float = 0.5
    ) -> None:
        super().__init__()
        if neighbours < 1 or neighbours > len(centres):
            raise ValueError(f"neighbours must be in [1, {len(centres)}]; got {neighbours}")
        if sigma <= 0:
            raise ValueError(f"sigma must be > 0; got {sigma}")
        if not 0.0 <= rebalance_lambda <= 1.0:
            raise ValueError(f"rebalance_lambda must be in [0, 1]; got {rebalance_lambda}")
        self.register_buffer("centres", centres.float().clone(), persistent=False)
        self.neighbours = neighbours
        self.sigma = sigma
        self.rebalance_lambda = rebalance_lambda

    def forward(self, logits: torch.Tensor, ab: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:
        """
        Args:
            logits: predicted bin scores. Shape: (batch_size, num_bins, H, W).
            ab: true ab values. Shape: (batch_size, 2, H, W).
            prior: empirical bin frequencies (the rebalancing prior). Shape: (num_bins,).
        """
        with torch.no_grad():
            target = soft_encode_ab(ab, self.centres, self.neighbours, self.sigma)  # (B, Q, H, W)
            weights = rebalancing_weights(prior, self.centres, self.rebalance_lambda, self.sigma)  # (Q,)
            pixel_weight = weights[target.argmax(1)]  # (B, H, W)
        cross_entropy = -(target * F.log_softmax(logits.float(), dim=1)).sum(1)  # (B, H, W)
        return (pixel_weight * cross_entropy).mean()


def annealed_mean(logits: torch.Tensor, centres: torch.Tensor, temperature: float = 0.38) -> torch.Tensor:
    """Zhang's decoding: the mean of the temperature-sharpened bin distribution (T = 0.38).

    Shape: (batch_size, num_bins, H, W) -> ab (batch_size, 2, H, W).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0; got {temperature}")
    probabilities = torch.softmax(logits.float() / temperature, dim=1)
    return torch.einsum("bqhw,qc->bchw", probabilities, centres.float())
