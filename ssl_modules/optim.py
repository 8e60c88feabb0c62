"""Optimizer parts for joint-embedding methods: weight-decay parameter groups and LARS.

- [0] LARS, You et al., 2017, https://arxiv.org/abs/1708.03888
- [1] SimCLR (LARS, no weight decay / adaptation for biases and BatchNorm), Chen et al., 2020,
  https://arxiv.org/abs/2002.05709
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn


def param_groups(parameters: Iterable[nn.Parameter], weight_decay: float) -> list[dict]:
    """Two parameter groups of the trainable ``parameters``: weights with
    ``weight_decay``, and biases and normalisation parameters (every parameter with fewer than
    two dimensions) with no weight decay and ``lars_exclude=True`` (no LARS trust ratio).

    Other optimizers ignore the ``lars_exclude`` key.
    """
    decay, no_decay = [], []
    for parameter in parameters:
        if parameter.requires_grad:
            (decay if parameter.ndim >= 2 else no_decay).append(parameter)
    groups = [{"params": decay, "weight_decay": weight_decay, "lars_exclude": False}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0, "lars_exclude": True})
    return groups


class LARS(torch.optim.Optimizer):
    """SGD with momentum and a layer-wise trust ratio ``eta * |w| / |g + wd * w|``.

    Update per parameter ``w`` with gradient ``g``::

        d = g + weight_decay * w
        d = d * trust_coefficient * |w| / |d|     (unless the group has lars_exclude=True,
                                                   or |w| or |d| is 0)
        v = momentum * v + d
        w = w - lr * v

    - [0] LARS, You et al., 2017, https://arxiv.org/abs/1708.03888

    Args:
        params: parameters or groups (``param_groups`` gives the usual SimCLR/BYOL groups).
        lr: learning rate.
        momentum: heavy-ball momentum.
        weight_decay: L2 penalty added to the gradient before the trust ratio.
        trust_coefficient: eta (1e-3 in SimCLR/BYOL/Barlow Twins).
    """

    def __init__(
        self,
        params: Iterable,
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        trust_coefficient: float = 0.001,
    ) -> None:
        if lr <= 0:
            raise ValueError(f"lr must be > 0; got {lr}")
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum must be in [0, 1); got {momentum}")
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "weight_decay": weight_decay,
            "trust_coefficient": trust_coefficient,
            "lars_exclude": False,
        }
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for parameter in group["params"]:
                if parameter.grad is None:
                    continue
                update = parameter.grad
                if not group["lars_exclude"]:
                    if group["weight_decay"] != 0:
                        update = update.add(parameter, alpha=group["weight_decay"])
                    weight_norm = torch.linalg.vector_norm(parameter)
                    update_norm = torch.linalg.vector_norm(update)
                    trust = torch.where(
                        (weight_norm > 0) & (update_norm > 0),
                        group["trust_coefficient"] * weight_norm / update_norm,
                        torch.ones_like(weight_norm),
                    )
                    update = update.mul(trust)
                elif group["weight_decay"] != 0:
                    update = update.add(parameter, alpha=group["weight_decay"])
                state = self.state[parameter]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.clone(update).detach()
                else:
                    state["momentum_buffer"].mul_(group["momentum"]).add_(update)
                parameter.add_(state["momentum_buffer"], alpha=-group["lr"])
        return loss


def joint_embedding_optimizer(
    module: nn.Module, lr: float, weight_decay: float, lars: bool, momentum: float = 0.9
) -> torch.optim.Optimizer:
    """LARS or SGD (momentum ``momentum``) over ``param_groups`` of ``module``'s trainable parameters.

    A submodule named ``online_probe`` (the detached linear probe of ``SelfSupervisedModule``)
    gets its own group without weight decay or LARS adaptation: the trust ratio would scale a
    freshly initialised probe's steps down by ~1000x and it would not learn during the run.
    """
    probe = [
        p for name, p in module.named_parameters() if name.startswith("online_probe.") and p.requires_grad
    ]
    others = [p for name, p in module.named_parameters() if not name.startswith("online_probe.")]
    groups = param_groups(others, weight_decay)
    if probe:
        groups.append({"params": probe, "weight_decay": 0.0, "lars_exclude": True})
    if lars:
        return LARS(groups, lr=lr, momentum=momentum, weight_decay=weight_decay)
    return torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay)
