"""Backbones by name: each maps images ``(B, C, H, W)`` to features ``(B, num_features)``.

- ``"small_cnn"``: a 4-block convnet for 8-32 px images (the CPU default).
- ``"resnet18"``, ``"resnet50"``: torchvision ResNets with the small-image stem of the
  CIFAR experiments (3x3 stride-1 first convolution, no max-pool).
  - [0] ResNet, He et al., 2016, https://arxiv.org/abs/1512.03385
  - [1] SimCLR (CIFAR stem, appendix B.9), Chen et al., 2020, https://arxiv.org/abs/2002.05709
- any torchvision classification model by its name (``torchvision.models.list_models``),
  e.g. ``"resnet34"``, ``"efficientnet_b0"``, ``"convnext_tiny"``: its first convolution is
  rebuilt for the data's channels and its classifier replaced by the identity. Weights are
  random: nothing is downloaded.

No Lightning and no dataset knowledge here: the number of input channels is an argument.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torchvision
from torch import nn


class SmallConvNet(nn.Module):
    """Four conv-BN-ReLU blocks with two 2x down-samplings, then global average pooling.

    Args:
        channels: input channels (1 or 3).
        width: channels of the first block; later blocks use 2x width.
        drop_rate: dropout before the features (Noisy Student's student noise).

    Shape:
        input (batch_size, channels, H, W) with H, W >= 4; output (batch_size, 2 * width).
    """

    def __init__(self, channels: int = 3, width: int = 32, drop_rate: float = 0.0) -> None:
        super().__init__()

        def block(cin: int, cout: int) -> list[nn.Module]:
            return [
                nn.Conv2d(cin, cout, 3, padding=1, bias=False),
                nn.BatchNorm2d(cout),
                nn.ReLU(inplace=True),
            ]

        self.features = nn.Sequential(
            *block(channels, width),
            *block(width, width),
            nn.MaxPool2d(2),
            *block(width, 2 * width),
            nn.MaxPool2d(2, ceil_mode=True),
            *block(2 * width, 2 * width),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Dropout(drop_rate),
        )
        self.num_features = 2 * width

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.features(images)


def _replace_first_conv(model: nn.Module, channels: int, small_stem: bool) -> None:
    """Rebuild the first Conv2d for ``channels`` inputs (and a 3x3 stride-1 stem if asked)."""
    for parent in model.modules():
        for name, child in parent.named_children():
            if isinstance(child, nn.Conv2d):
                if small_stem:
                    conv = nn.Conv2d(channels, child.out_channels, 3, stride=1, padding=1, bias=False)
                else:
                    conv = nn.Conv2d(
                        channels,
                        child.out_channels,
                        child.kernel_size,
                        stride=child.stride,
                        padding=child.padding,
                        bias=child.bias is not None,
                    )
                setattr(parent, name, conv)
                return
    raise ValueError(f"{type(model).__name__} has no Conv2d to adapt to {channels} channels")


def _strip_classifier(model: nn.Module) -> int:
    """Replace the final classification Linear by the identity; return the feature width."""
    for attr in ("fc", "classifier", "head", "heads"):
        layer = getattr(model, attr, None)
        if isinstance(layer, nn.Linear):
            setattr(model, attr, nn.Identity())
            return layer.in_features
        if isinstance(layer, nn.Sequential):
            # heads such as MobileNetV3's (Linear, act, dropout, Linear) or ConvNeXt's
            # (norm, flatten, Linear): only the last Linear is the classifier
            positions = [i for i, child in enumerate(layer) if isinstance(child, nn.Linear)]
            if positions:
                last = layer[positions[-1]]
                layer[positions[-1]] = nn.Identity()
                return last.in_features
    raise ValueError(f"cannot find the classifier of torchvision model {type(model).__name__}")


class TorchvisionBackbone(nn.Module):
    """A torchvision classification model without its classifier (see module docstring)."""

    def __init__(
        self, name: str, channels: int = 3, small_stem: bool = False, drop_rate: float = 0.0
    ) -> None:
        super().__init__()
        kwargs = {"weights": None}
        if name == "inception_v3" or name == "googlenet":
            kwargs["aux_logits"] = False
            kwargs["init_weights"] = True
        model = torchvision.models.get_model(name, **kwargs)
        _replace_first_conv(model, channels, small_stem)
        if small_stem and hasattr(model, "maxpool"):
            model.maxpool = nn.Identity()
        self.num_features = _strip_classifier(model)
        self.model = model
        self.dropout = nn.Dropout(drop_rate)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.dropout(torch.flatten(self.model(images), 1))


def _resnet(name: str) -> Callable[..., nn.Module]:
    def build(channels: int, drop_rate: float = 0.0) -> nn.Module:
        return TorchvisionBackbone(name, channels, small_stem=True, drop_rate=drop_rate)

    return build


_BUILTIN: dict[str, Callable[..., nn.Module]] = {
    "small_cnn": lambda channels, drop_rate=0.0: SmallConvNet(channels, width=32, drop_rate=drop_rate),
    "small_cnn_wide": lambda channels, drop_rate=0.0: SmallConvNet(channels, width=64, drop_rate=drop_rate),
    "resnet18": _resnet("resnet18"),
    "resnet50": _resnet("resnet50"),
}


def available_backbones() -> list[str]:
    """Every name ``build_backbone`` accepts."""
    torchvision_names = torchvision.models.list_models(module=torchvision.models)
    return sorted(set(_BUILTIN) | set(torchvision_names))


def build_backbone(name: str, channels: int, drop_rate: float = 0.0) -> nn.Module:
    """Build the backbone ``name`` for images with ``channels`` channels.

    Returns a module with ``num_features`` mapping (B, channels, H, W) -> (B, num_features).
    """
    if channels < 1:
        raise ValueError(f"channels must be >= 1; got {channels}")
    if name in _BUILTIN:
        return _BUILTIN[name](channels, drop_rate=drop_rate)
    if name in torchvision.models.list_models(module=torchvision.models):
        return TorchvisionBackbone(name, channels, small_stem=False, drop_rate=drop_rate)
    raise ValueError(f"unknown backbone {name!r}; choose one of: {', '.join(available_backbones())}")


def first_conv_in_channels(module: nn.Module) -> int:
    """The input channels a backbone expects (from its first Conv2d)."""
    for layer in module.modules():
        if isinstance(layer, nn.Conv2d):
            return layer.in_channels
    raise ValueError(f"{type(module).__name__} has no Conv2d")
