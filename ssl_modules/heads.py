"""One MLP head for every method (projection, prediction, probe), built from layer classes.

Presets as arguments rather than subclasses:

- SimCLR projection: ``MLPHead(d, [2048], 128, norm_layer=nn.BatchNorm1d)``
  - [0] SimCLR, Chen et al., 2020, https://arxiv.org/abs/2002.05709
- MoCo v2 projection: ``MLPHead(d, [2048], 128, norm_layer=None)``
  - [1] MoCo v2, Chen et al., 2020, https://arxiv.org/abs/2003.04297
- BYOL projection/prediction: ``MLPHead(d, [4096], 256, norm_layer=nn.BatchNorm1d)``
  - [2] BYOL, Grill et al., 2020, https://arxiv.org/abs/2006.07733
- Barlow Twins projector: ``MLPHead(d, [8192, 8192], 8192, norm_layer=nn.BatchNorm1d)``
  - [3] Barlow Twins, Zbontar et al., 2021, https://arxiv.org/abs/2103.03230
- linear probe: ``MLPHead(d, [], num_classes)``
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class MLPHead(nn.Module):
    """Linear -> [norm] -> activation, per hidden layer, then a final Linear [-> output norm].

    Args:
        in_features: input width.
        hidden_features: widths of the hidden layers; empty for a linear head.
        out_features: output width.
        norm_layer: normalisation class applied after each hidden Linear (or None).
        activation: activation class after each hidden layer.
        output_norm: normalisation class applied to the output (e.g. BatchNorm1d without
            affine parameters in SimCLR v2), or None.
        bias: bias in hidden Linear layers (disabled automatically when followed by a norm).

    Shape:
        input (batch_size, in_features); output (batch_size, out_features).
    """

    def __init__(
        self,
        in_features: int,
        hidden_features: Sequence[int],
        out_features: int,
        norm_layer: type[nn.Module] | None = nn.BatchNorm1d,
        activation: type[nn.Module] = nn.ReLU,
        output_norm: type[nn.Module] | None = None,
        bias: bool = True,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = in_features
        for hidden in hidden_features:
            layers.append(nn.Linear(width, hidden, bias=bias and norm_layer is None))
            if norm_layer is not None:
                layers.append(norm_layer(hidden))
            layers.append(activation())
            width = hidden
        layers.append(nn.Linear(width, out_features))
        if output_norm is not None:
            layers.append(output_norm(out_features))
        self.layers = nn.Sequential(*layers)
        self.in_features = in_features
        self.out_features = out_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.layers(features)
