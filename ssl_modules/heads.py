"""Heads: one generic MLP built from layer classes, and the named heads of the joint-embedding
methods (projection, prediction, prototypes) as presets of it.

The presets, by method (each method's module passes its paper's widths):

- SimCLR projection: ``projection_head(d, 2048, 128)`` (one hidden layer, BatchNorm)
  - [0] SimCLR, Chen et al., 2020, https://arxiv.org/abs/2002.05709
- MoCo v2 projection: ``projection_head(d, 2048, 128, batch_norm=False)``
  - [1] MoCo v2, Chen et al., 2020, https://arxiv.org/abs/2003.04297
- BYOL projection and prediction: ``projection_head(d, 4096, 256)``, ``prediction_head(256, 4096, 256)``
  - [2] BYOL, Grill et al., 2020, https://arxiv.org/abs/2006.07733
- Barlow Twins projector: ``projection_head(d, 8192, 8192, num_hidden_layers=2)``
  - [3] Barlow Twins, Zbontar et al., 2021, https://arxiv.org/abs/2103.03230
- VICReg expander: ``projection_head(d, 8192, 8192, num_hidden_layers=2)``
  - [4] VICReg, Bardes et al., 2022, https://arxiv.org/abs/2105.04906
- SimSiam projection and prediction: ``projection_head(d, 2048, 2048, num_hidden_layers=2,
  output_batch_norm=True)``, ``prediction_head(2048, 512, 2048)`` (a bottleneck)
  - [5] SimSiam, Chen & He, 2021, https://arxiv.org/abs/2011.10566
- SwAV prototypes: ``prototypes(d, 3000)``
  - [6] SwAV, Caron et al., 2020, https://arxiv.org/abs/2006.09882
- linear probe: ``MLPHead(d, [], num_classes)``

``projection_head`` and ``prediction_head`` return ``MLPHead``s, so a module's parameter names
(``projector.layers.0.weight``, ...) do not depend on which preset built it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

NormFactory = Callable[[int], nn.Module]


class MLPHead(nn.Module):
    """Linear -> [norm] -> activation, per hidden layer, then a final Linear [-> output norm].

    Args:
        in_features: input width.
        hidden_features: widths of the hidden layers; empty for a linear head.
        out_features: output width.
        norm_layer: normalisation class (or factory taking the width) applied after each
            hidden Linear, or None.
        activation: activation class after each hidden layer.
        output_norm: normalisation class (or factory) applied to the output (e.g. SimSiam's
            BatchNorm1d without affine parameters), or None.
        bias: bias in the hidden Linear layers. A Linear followed by a norm has no bias (the
            norm's mean subtraction would cancel it): the hidden ones when ``norm_layer`` is
            set, the final one when ``output_norm`` is.

    Shape:
        input (batch_size, in_features); output (batch_size, out_features).
    """

    def __init__(
        self,
        in_features: int,
        hidden_features: Sequence[int],
        out_features: int,
        norm_layer: NormFactory | None = nn.BatchNorm1d,
        activation: type[nn.Module] = nn.ReLU,
        output_norm: NormFactory | None = None,
        bias: bool = True,
    ) -> None:
        super().__init__()
        if in_features < 1 or out_features < 1 or any(width < 1 for width in hidden_features):
            raise ValueError(
                f"layer widths must be >= 1; got in_features={in_features}, "
                f"hidden_features={list(hidden_features)}, out_features={out_features}"
            )
        layers: list[nn.Module] = []
        width = in_features
        for hidden in hidden_features:
            layers.append(nn.Linear(width, hidden, bias=bias and norm_layer is None))
            if norm_layer is not None:
                layers.append(norm_layer(hidden))
            layers.append(activation())
            width = hidden
        layers.append(nn.Linear(width, out_features, bias=output_norm is None))
        if output_norm is not None:
            layers.append(output_norm(out_features))
        self.layers = nn.Sequential(*layers)
        self.in_features = in_features
        self.out_features = out_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.layers(features)


def projection_head(
    in_features: int,
    hidden_features: int,
    out_features: int,
    num_hidden_layers: int = 1,
    batch_norm: bool = True,
    output_batch_norm: bool = False,
) -> MLPHead:
    """The projector (g) of a joint-embedding method: ``num_hidden_layers`` x (Linear ->
    [BatchNorm] -> ReLU), then a Linear [-> BatchNorm without affine parameters].

    Presets (module docstring): SimCLR [0] and BYOL [2] one hidden layer with BatchNorm; MoCo v2
    [1] without BatchNorm; Barlow Twins [3] and VICReg [4] two hidden layers of 8192; SimSiam [5]
    two hidden layers and BatchNorm on the output ("BN applied to each fc layer, including its
    output fc"; affine-free as in the authors' code).

    - [0] SimCLR, Chen et al., 2020, https://arxiv.org/abs/2002.05709
    - [1] MoCo v2, Chen et al., 2020, https://arxiv.org/abs/2003.04297
    - [2] BYOL, Grill et al., 2020, https://arxiv.org/abs/2006.07733
    - [3] Barlow Twins, Zbontar et al., 2021, https://arxiv.org/abs/2103.03230
    - [4] VICReg, Bardes et al., 2022, https://arxiv.org/abs/2105.04906
    - [5] SimSiam, Chen & He, 2021, https://arxiv.org/abs/2011.10566

    Shape: (batch_size, in_features) -> (batch_size, out_features).
    """
    if num_hidden_layers < 1:
        raise ValueError(
            f"num_hidden_layers must be >= 1 (a projector is an MLP); got {num_hidden_layers}. "
            "Use MLPHead(d, [], out) for a linear head."
        )
    return MLPHead(
        in_features,
        [hidden_features] * num_hidden_layers,
        out_features,
        norm_layer=nn.BatchNorm1d if batch_norm else None,
        output_norm=functools.partial(nn.BatchNorm1d, affine=False) if output_batch_norm else None,
    )


def prediction_head(in_features: int, hidden_features: int, out_features: int) -> MLPHead:
    """The predictor (q / h) of BYOL [2] and SimSiam [5]: Linear -> BatchNorm -> ReLU -> Linear.

    BYOL: 256 -> 4096 -> 256; SimSiam: a bottleneck 2048 -> 512 -> 2048.

    - [2] BYOL, Grill et al., 2020, https://arxiv.org/abs/2006.07733
    - [5] SimSiam, Chen & He, 2021, https://arxiv.org/abs/2011.10566

    Shape: (batch_size, in_features) -> (batch_size, out_features).
    """
    return MLPHead(in_features, [hidden_features], out_features, norm_layer=nn.BatchNorm1d)


class Prototypes(nn.Module):
    """SwAV's prototypes: a bias-free linear layer whose rows (the prototypes) are unit vectors.

    ``forward`` returns the scores ``z @ C^T`` of L2-normalised embeddings ``z`` against the
    prototypes ``C``; call ``normalize_()`` after every optimizer step (SwAV re-normalises the
    prototypes each iteration, so the scores are cosine similarities).

    - [6] SwAV, Caron et al., 2020, https://arxiv.org/abs/2006.09882

    Args:
        in_features: embedding width (SwAV: 128).
        num_prototypes: K (SwAV: 3000 on ImageNet).

    Shape: (batch_size, in_features) -> (batch_size, num_prototypes).
    """

    def __init__(self, in_features: int, num_prototypes: int) -> None:
        super().__init__()
        if in_features < 1 or num_prototypes < 1:
            raise ValueError(
                f"in_features and num_prototypes must be >= 1; got {in_features}, {num_prototypes}"
            )
        self.layer = nn.Linear(in_features, num_prototypes, bias=False)
        self.normalize_()

    @torch.no_grad()
    def normalize_(self) -> None:
        """Project every prototype back to the unit sphere."""
        self.layer.weight.copy_(F.normalize(self.layer.weight, dim=1))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.layer(F.normalize(features, dim=1))


def prototypes(in_features: int, num_prototypes: int = 3000) -> Prototypes:
    """SwAV's prototypes (``Prototypes``), K = ``num_prototypes``.

    - [6] SwAV, Caron et al., 2020, https://arxiv.org/abs/2006.09882
    """
    return Prototypes(in_features, num_prototypes)
