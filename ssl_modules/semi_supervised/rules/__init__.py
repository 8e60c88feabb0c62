"""Pseudo-label rules for ``FixMatchModule`` (see ``rules.base`` for the interface).

- ``FixedThreshold``: FixMatch's fixed confidence threshold.
- ``FlexMatchThreshold``: curriculum per-class thresholds from per-image learning status.
- ``FreeMatchThreshold``: self-adaptive global and per-class thresholds, fairness loss.
- ``SoftMatchWeights``: truncated-Gaussian weights of the confidence, uniform alignment.
- ``UDAConsistency``: confidence mask with sharpened soft targets (UDA; its training-signal
  annealing is ``FixMatchModule(tsa=...)``).
- ``DistributionAlignment``: ReMixMatch/SoftMatch alignment, composes with any rule.
"""

from ssl_modules.semi_supervised.rules.base import (
    DistributionAlignment,
    FixedThreshold,
    PseudoLabelRule,
    PseudoLabels,
    build_rule,
    global_mean,
    rule_record,
)
from ssl_modules.semi_supervised.rules.flexmatch import FlexMatchThreshold
from ssl_modules.semi_supervised.rules.freematch import FreeMatchThreshold
from ssl_modules.semi_supervised.rules.softmatch import SoftMatchWeights
from ssl_modules.semi_supervised.rules.uda import (
    TSA_SCHEDULES,
    UDAConsistency,
    annealed_cross_entropy,
    tsa_threshold,
)

__all__ = [
    "DistributionAlignment",
    "FixedThreshold",
    "FlexMatchThreshold",
    "FreeMatchThreshold",
    "PseudoLabelRule",
    "PseudoLabels",
    "SoftMatchWeights",
    "TSA_SCHEDULES",
    "UDAConsistency",
    "annealed_cross_entropy",
    "tsa_threshold",
    "build_rule",
    "global_mean",
    "rule_record",
]
