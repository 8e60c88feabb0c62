"""Exponential moving averages of weights: EMA teachers, momentum encoders, evaluation EMA.

Decays are pure functions of ``global_step`` so that a resumed run continues exactly.

- [0] Mean Teacher, Tarvainen & Valpola, 2017, https://arxiv.org/abs/1703.01780
- [1] BYOL (cosine momentum schedule), Grill et al., 2020, https://arxiv.org/abs/2006.07733
"""

from __future__ import annotations

import copy
import math

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn


def warmup_ema_decay(step: int, decay: float) -> float:
    """Mean Teacher's ``min(1 - 1 / (step + 1), decay)``: early on, the average follows the
    student closely instead of averaging in the random initialisation."""
    return min(1.0 - 1.0 / (step + 1), decay)


def warn_if_ema_outlasts_run(
    decay: float, total_steps: float, what: str, fraction: float = 0.5
) -> str | None:
    """Warn when an EMA's horizon ``1 / (1 - decay)`` exceeds ``fraction`` of the run.

    With the warm-up above, such an EMA ends as a near-uniform average of every iterate of the
    run, early ones included, and lags the live model: FixMatch on the digits (500 steps, median
    val/acc over 3 seeds) scored 0.917 with a 0.999 EMA against 0.959 for its live weights and 0.966
    with a 0.99 EMA. Returns the message (or None).
    """
    if decay >= 1.0 or not math.isfinite(total_steps) or total_steps <= 0:
        return None  # a frozen EMA, or a run without a known length
    total_steps = int(total_steps)
    horizon = 1.0 / (1.0 - decay)
    if horizon <= fraction * total_steps:
        return None
    suggestion = max(0.0, 1.0 - 1.0 / max(1.0, 0.2 * total_steps))
    message = (
        f"{what}: ema_decay={decay} averages over ~{horizon:.0f} steps, {horizon / total_steps:.0%} of this "
        f"{total_steps}-step run, so the EMA weights will lag the trained ones. For a run this short set "
        f"ema_decay to about {suggestion:.3g} (a horizon of ~20% of the run); the papers' 0.999 assumes ~1M steps."
    )
    rank_zero_warn(message)
    return message


def cosine_momentum(step: int, total_steps: int, base_momentum: float, final_momentum: float = 1.0) -> float:
    """BYOL/MoCo-v3 schedule: ``final - (final - base) * (cos(pi * step / total) + 1) / 2``."""
    progress = min(1.0, step / max(1, total_steps))
    return final_momentum - (final_momentum - base_momentum) * (math.cos(math.pi * progress) + 1) / 2


def copy_frozen(module: nn.Module) -> nn.Module:
    """A deep copy with ``requires_grad=False`` everywhere: a teacher or momentum encoder."""
    teacher = copy.deepcopy(module)
    teacher.requires_grad_(False)
    return teacher


@torch.no_grad()
def ema_update(target: nn.Module, online: nn.Module, decay: float) -> None:
    """``target = decay * target + (1 - decay) * online`` for parameters; buffers
    (BatchNorm running statistics) are copied, as in Mean Teacher and BYOL."""
    target_params = list(target.parameters())
    online_params = list(online.parameters())
    if len(target_params) != len(online_params):
        raise ValueError("target and online modules must have the same parameters")
    if target_params:
        torch._foreach_lerp_(target_params, online_params, 1.0 - decay)
    for target_buffer, online_buffer in zip(target.buffers(), online.buffers()):
        target_buffer.copy_(online_buffer)
