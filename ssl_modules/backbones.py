"""Backbones by name: each maps images ``(B, C, H, W)`` to features ``(B, num_features)``.

- ``"small_cnn"``: a 4-block convnet for 8-32 px images (the CPU default).
- ``"resnet18"``, ``"resnet50"``: torchvision ResNets with the small-image stem of the
  CIFAR experiments (3x3 stride-1 first convolution, no max-pool).
  - [0] ResNet, He et al., 2016, https://arxiv.org/abs/1512.03385
  - [1] SimCLR (CIFAR stem, appendix B.9), Chen et al., 2020, https://arxiv.org/abs/2002.05709
- ``"wrn_28_2"``, ``"wrn_28_8"``, ``"wrn_37_2"``: the Wide ResNets of the semi-supervised
  protocol (FixMatch and its successors: WRN-28-2 for CIFAR-10 and SVHN, WRN-28-8 for
  CIFAR-100, WRN-37-2 for STL-10), in FixMatch's variant (``WideResNet``).
  - [2] Wide ResNet, Zagoruyko & Komodakis, 2016, https://arxiv.org/abs/1605.07146
  - [3] FixMatch (backbones, appendix), Sohn et al., 2020, https://arxiv.org/abs/2001.07685
- any torchvision classification model by its name (``torchvision.models.list_models``),
  e.g. ``"resnet34"``, ``"efficientnet_b0"``, ``"convnext_tiny"``: its first convolution is
  rebuilt for the data's channels and its classifier replaced by the identity. Weights are
  random: nothing is downloaded.
- ``"vit_mini"``, ``"vit_tiny"``, ``"vit_small"``, ``"vit_base"``: Vision Transformers built by
  ``timm`` (``ViTBackbone``), with a patch size that follows ``image_size`` (``vit_patch_size``);
  their features are the class token. Random weights as well.
  - [4] ViT, Dosovitskiy et al., 2021, https://arxiv.org/abs/2010.11929
  - [5] DeiT (the Tiny and Small widths), Touvron et al., 2021, https://arxiv.org/abs/2012.12877

No Lightning and no dataset knowledge here: the number of input channels is an argument.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torchvision
from timm.models.vision_transformer import VisionTransformer
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


# FixMatch's variant of the Wide ResNet: leaky ReLU (slope 0.1) instead of ReLU, and BatchNorm
# with TensorFlow's momentum 0.999 (PyTorch's momentum is 1 - that) and epsilon 1e-3.
WRN_LEAKY_SLOPE = 0.1
WRN_BN_MOMENTUM = 0.001
WRN_BN_EPS = 1e-3


def _wrn_norm(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=WRN_BN_EPS, momentum=WRN_BN_MOMENTUM)


class _WideBlock(nn.Module):
    """Pre-activation residual block: ``shortcut(x) + conv(act(bn(conv(act(bn(x))))))``.

    As in FixMatch's reference (TensorFlow ``libml/models.py``): the first convolution always
    sees the activated input; the shortcut sees the raw input (a 1x1 convolution where the
    width or stride changes), except in the first block of the network
    (``activate_before_residual``), whose shortcut also takes the activated input.
    """

    def __init__(self, cin: int, cout: int, stride: int, activate_before_residual: bool) -> None:
        super().__init__()
        self.bn1 = _wrn_norm(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn2 = _wrn_norm(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, stride=1, padding=1, bias=False)
        self.act = nn.LeakyReLU(WRN_LEAKY_SLOPE)
        self.shortcut = (
            nn.Conv2d(cin, cout, 1, stride=stride, bias=False) if cin != cout or stride != 1 else None
        )
        self.activate_before_residual = activate_before_residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        activated = self.act(self.bn1(x))
        residual = activated if self.activate_before_residual else x
        out = self.conv2(self.act(self.bn2(self.conv1(activated))))
        if self.shortcut is not None:
            residual = self.shortcut(residual)
        return residual + out


class WideResNet(nn.Module):
    """Wide ResNet WRN-d-k in FixMatch's variant; the classifier is the module's own Linear.

    A 3x3 stem with 16 channels, then ``groups`` groups of ``blocks_per_group`` pre-activation
    blocks of widths ``16k, 32k, 64k (, 128k)`` (stride 1 for the first group, 2 for the others),
    then BatchNorm + leaky ReLU and global average pooling. The depth counts the convolutions:
    ``d = 1 (stem) + 2 * groups * blocks_per_group + groups (1x1 shortcuts)``, so
    3 groups of 4 blocks are WRN-28 and 4 groups of 4 blocks WRN-37 (FixMatch's STL-10 network,
    whose fourth group handles the 96 px images). Convolutions have no bias, as in the PyTorch
    references (the TensorFlow reference keeps them: +2,032 parameters for WRN-28-2).

    Parameters, with a 10-class (WRN-28-8: 100-class) classifier as counted in the papers:
    WRN-28-2 1,467,610 (published 1.47 M / "1.5 M"), WRN-28-8 23,401,012 (23.4 M), WRN-37-2
    5,929,434 (5.9 M); without the classifier 1,466,320, 23,349,712 and 5,926,864.

    Initialisation of the reference implementations: convolutions He-normal with fan-out
    (std ``sqrt(2 / (k * k * out_channels))``), BatchNorm weight 1 and bias 0. The classifier
    (Xavier-normal weight, zero bias in the reference) is the module's; ``init_classifier``
    applies the reference's initialisation to one.

    - [0] Wide ResNet, Zagoruyko & Komodakis, 2016, https://arxiv.org/abs/1605.07146
    - [1] FixMatch (WRN-28-2, WRN-28-8, WRN-37-2; leaky ReLU 0.1, BN momentum 0.999), Sohn et al.,
      2020, https://arxiv.org/abs/2001.07685

    Args:
        channels: input channels.
        widen_factor: k.
        groups: 3 (WRN-28) or 4 (WRN-37).
        blocks_per_group: 4 for both.
        drop_rate: dropout before the features, as for every backbone here (FixMatch: 0).

    Shape: (batch_size, channels, H, W) -> (batch_size, 16 * k * 2 ** (groups - 1)).
    """

    def __init__(
        self,
        channels: int = 3,
        widen_factor: int = 2,
        groups: int = 3,
        blocks_per_group: int = 4,
        drop_rate: float = 0.0,
    ) -> None:
        super().__init__()
        if widen_factor < 1 or groups < 1 or blocks_per_group < 1:
            raise ValueError(
                f"widen_factor, groups and blocks_per_group must be >= 1; got {widen_factor}, {groups}, "
                f"{blocks_per_group}"
            )
        widths = [16 * widen_factor * 2**group for group in range(groups)]
        layers: list[nn.Module] = [nn.Conv2d(channels, 16, 3, padding=1, bias=False)]
        cin = 16
        for group, width in enumerate(widths):
            for block in range(blocks_per_group):
                first = block == 0
                layers.append(
                    _WideBlock(
                        cin if first else width,
                        width,
                        stride=2 if first and group > 0 else 1,
                        activate_before_residual=first and group == 0,
                    )
                )
            cin = width
        layers += [
            _wrn_norm(cin),
            nn.LeakyReLU(WRN_LEAKY_SLOPE),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Dropout(drop_rate),
        ]
        self.features = nn.Sequential(*layers)
        self.num_features = cin
        self.depth = 1 + 2 * groups * blocks_per_group + groups
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="leaky_relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.features(images)

    @staticmethod
    def init_classifier(layer: nn.Linear) -> nn.Linear:
        """The reference's classifier initialisation: Xavier-normal weight, zero bias."""
        nn.init.xavier_normal_(layer.weight)
        if layer.bias is not None:
            nn.init.zeros_(layer.bias)
        return layer


def _wide_resnet(widen_factor: int, groups: int) -> Callable[..., nn.Module]:
    def build(channels: int, drop_rate: float = 0.0) -> nn.Module:
        return WideResNet(channels, widen_factor=widen_factor, groups=groups, drop_rate=drop_rate)

    return build


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


def vit_patch_size(image_size: int) -> int:
    """The patch side a ViT uses for ``image_size`` px images: 4 up to 32 px, 8 up to 64 px, else 16.

    16 px patches are ViT's choice at 224 px (14 x 14 tokens); small images keep a comparable
    token grid with smaller patches (an 8 x 8 grid at 32 px with 4 px patches, as the ViTs
    trained from scratch on CIFAR use; 8 x 8 at 64 px; 6 x 6 at 96 px).
    """
    if image_size < 1:
        raise ValueError(f"image_size must be >= 1; got {image_size}")
    if image_size <= 32:
        return 4
    if image_size <= 64:
        return 8
    return 16


# name: (embed_dim, depth, num_heads), the shapes of timm's vit_{tiny,small,base}_patch16_224;
# "vit_mini" is ViT-Tiny's width (192, 3 heads of 64) at half its depth (6 blocks), small enough
# to train from scratch on 16-32 px images on a CPU.
VIT_SHAPES: dict[str, tuple[int, int, int]] = {
    "vit_mini": (192, 6, 3),
    "vit_tiny": (192, 12, 3),
    "vit_small": (384, 12, 6),
    "vit_base": (768, 12, 12),
}


class ViTBackbone(VisionTransformer):
    """timm's ``VisionTransformer`` with the class token as features, for any image size.

    Pre-norm blocks (MLP ratio 4), a learned position embedding that includes the class token,
    a final LayerNorm; no classifier (``num_classes=0``), so ``forward`` returns the normalised
    class token (pre-logits), after dropout ``drop_rate``. ``dynamic_img_size=True``: images of
    another side than ``image_size`` (multi-crop's local views) are accepted when their side is
    a multiple of ``patch_size``, the position embedding being resampled (bicubic) to their token
    grid. The state dict keys are timm's own, so the weights load into a
    ``timm.models.vision_transformer.VisionTransformer`` built with the same arguments.

    For methods that need more than the class token:

    - ``embed_tokens``: patch embedding + position embedding (what the blocks take);
    - ``forward_encoder_visible``: the encoder on a subset of the patch tokens (MAE);
    - ``last_block_attention``: the class token's attention in the last block (DINO's maps).

    - [0] ViT, Dosovitskiy et al., 2021, https://arxiv.org/abs/2010.11929
    - [1] timm, Wightman, 2019, https://github.com/huggingface/pytorch-image-models

    Args:
        channels: input channels (``in_chans``).
        image_size: side of the square images the position embedding is made for.
        embed_dim: token width (= ``num_features``).
        depth: number of transformer blocks.
        num_heads: attention heads per block.
        patch_size: patch side (default ``vit_patch_size(image_size)``); must divide ``image_size``.
        drop_rate: dropout on the output features.
        drop_path_rate: stochastic depth of the last block (linear in depth; DINO's ViT-S: 0.1).

    Shape: (batch_size, channels, H, W) with H, W multiples of ``patch_size`` -> (batch_size, embed_dim).
    """

    def __init__(
        self,
        channels: int = 3,
        image_size: int = 32,
        embed_dim: int = 192,
        depth: int = 6,
        num_heads: int = 3,
        patch_size: int | None = None,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
    ) -> None:
        patch_size = vit_patch_size(image_size) if patch_size is None else patch_size
        if patch_size < 1 or image_size % patch_size != 0:
            raise ValueError(
                f"a ViT needs image_size divisible by its patch size; got image_size={image_size} and "
                f"patch_size={patch_size}; resize the images to a multiple of {patch_size} px (e.g. "
                f"{max(patch_size, image_size // patch_size * patch_size)})."
            )
        if embed_dim % num_heads != 0:
            raise ValueError(f"embed_dim must be divisible by num_heads; got {embed_dim} and {num_heads}")
        super().__init__(
            img_size=image_size,
            patch_size=patch_size,
            in_chans=channels,
            num_classes=0,
            global_pool="token",
            embed_dim=embed_dim,
            depth=depth,
            num_heads=num_heads,
            dynamic_img_size=True,
            drop_rate=drop_rate,
            drop_path_rate=drop_path_rate,
        )
        self.patch_size = patch_size

    def embed_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """Patch embedding, then the position embedding (resampled to the image's token grid).

        Token 0 is the class token, then the patches in row-major order of the
        ``(H / patch_size, W / patch_size)`` grid.

        Shape: (batch_size, channels, H, W) -> (batch_size, 1 + num_patches, embed_dim).
        """
        tokens = self._pos_embed(self.patch_embed(images))  # patch_embed gives (B, h, w, D) here
        return self.norm_pre(self.patch_drop(tokens))

    def forward_encoder_visible(self, images: torch.Tensor, keep_index: torch.Tensor) -> torch.Tensor:
        """The encoder on the class token and the patches ``keep_index`` only (MAE's encoder).

        Patches carry their position embedding before they are selected, so each kept token
        knows where it was; the blocks and the final norm then see ``1 + num_kept`` tokens.
        With every patch kept, token 0 of the output is ``forward``'s features (before dropout).

        - [0] MAE (encoder on visible patches), He et al., 2022, https://arxiv.org/abs/2111.06377

        Args:
            images: Shape: (batch_size, channels, H, W).
            keep_index: indices in ``[0, num_patches)`` of the patches to keep, per image
                (row-major in the token grid). Shape: (batch_size, num_kept), integer.

        Returns: the encoded tokens, class token first. Shape: (batch_size, 1 + num_kept, embed_dim).
        """
        if keep_index.ndim != 2 or keep_index.shape[0] != images.shape[0]:
            raise ValueError(
                f"keep_index must have shape (batch_size, num_kept) = ({images.shape[0]}, K); got "
                f"{tuple(keep_index.shape)}"
            )
        if keep_index.is_floating_point():
            raise ValueError(f"keep_index must hold integer indices; got {keep_index.dtype}")
        tokens = self.embed_tokens(images)  # (B, 1 + N, D)
        patches = tokens[:, self.num_prefix_tokens :]
        index = keep_index.long().unsqueeze(-1).expand(-1, -1, patches.shape[-1])  # (B, K, D)
        visible = torch.cat([tokens[:, : self.num_prefix_tokens], patches.gather(1, index)], dim=1)
        return self.norm(self.blocks(visible))

    def last_block_attention(self, images: torch.Tensor) -> torch.Tensor:
        """The class token's attention over the patches in the last block, per head (DINO's maps).

        The softmax of the last block's ``q_cls . k / sqrt(head_dim)``, without the class token's
        attention to itself (so a head's weights sum to at most 1). Reshape to
        ``(batch_size, num_heads, H / patch_size, W / patch_size)`` for an image.

        - [0] DINO (self-attention maps, figure 1), Caron et al., 2021, https://arxiv.org/abs/2104.14294

        Shape: (batch_size, channels, H, W) -> (batch_size, num_heads, num_patches).
        """
        tokens = self.embed_tokens(images)
        for block in self.blocks[:-1]:
            tokens = block(tokens)
        last = self.blocks[-1]
        attention = last.attn
        batch_size, num_tokens, _ = tokens.shape
        qkv = attention.qkv(last.norm1(tokens))  # (B, T, 3 * heads * head_dim)
        qkv = qkv.reshape(batch_size, num_tokens, 3, attention.num_heads, attention.head_dim)
        query, key, _ = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, T, head_dim)
        query, key = attention.q_norm(query), attention.k_norm(key)
        cls_query = query[:, :, :1] * attention.scale  # (B, heads, 1, head_dim)
        weights = (cls_query @ key.transpose(-2, -1)).softmax(dim=-1)  # (B, heads, 1, T)
        return weights[:, :, 0, self.num_prefix_tokens :]


def _vit(name: str) -> Callable[..., nn.Module]:
    embed_dim, depth, num_heads = VIT_SHAPES[name]

    def build(channels: int, drop_rate: float = 0.0, image_size: int | None = None) -> nn.Module:
        if image_size is None:
            raise ValueError(
                f"backbone {name!r} needs image_size (its patch size and position embedding follow it); "
                f"pass build_backbone({name!r}, channels, image_size=...)."
            )
        return ViTBackbone(
            channels, image_size, embed_dim=embed_dim, depth=depth, num_heads=num_heads, drop_rate=drop_rate
        )

    return build


_BUILTIN: dict[str, Callable[..., nn.Module]] = {
    "small_cnn": lambda channels, drop_rate=0.0: SmallConvNet(channels, width=32, drop_rate=drop_rate),
    "small_cnn_wide": lambda channels, drop_rate=0.0: SmallConvNet(channels, width=64, drop_rate=drop_rate),
    "resnet18": _resnet("resnet18"),
    "resnet50": _resnet("resnet50"),
    "wrn_28_2": _wide_resnet(2, groups=3),
    "wrn_28_8": _wide_resnet(8, groups=3),
    "wrn_37_2": _wide_resnet(2, groups=4),
}
_VIT: dict[str, Callable[..., nn.Module]] = {name: _vit(name) for name in VIT_SHAPES}


def available_backbones() -> list[str]:
    """Every name ``build_backbone`` accepts."""
    torchvision_names = torchvision.models.list_models(module=torchvision.models)
    return sorted(set(_BUILTIN) | set(_VIT) | set(torchvision_names))


def build_backbone(
    name: str, channels: int, drop_rate: float = 0.0, image_size: int | None = None
) -> nn.Module:
    """Build the backbone ``name`` for images with ``channels`` channels.

    ``image_size`` is the side of the images it will see: the ViTs (``vit_*``) need it (their
    patch size and position embedding follow it); the convolutional backbones take any size and
    ignore it.

    Returns a module with ``num_features`` mapping (B, channels, H, W) -> (B, num_features).
    """
    if channels < 1:
        raise ValueError(f"channels must be >= 1; got {channels}")
    if name in _BUILTIN:
        return _BUILTIN[name](channels, drop_rate=drop_rate)
    if name in _VIT:
        return _VIT[name](channels, drop_rate=drop_rate, image_size=image_size)
    if name in torchvision.models.list_models(module=torchvision.models):
        return TorchvisionBackbone(name, channels, small_stem=False, drop_rate=drop_rate)
    raise ValueError(f"unknown backbone {name!r}; choose one of: {', '.join(available_backbones())}")


def first_conv_in_channels(module: nn.Module) -> int:
    """The input channels a backbone expects (from its first Conv2d: a ViT's patch embedding)."""
    for layer in module.modules():
        if isinstance(layer, nn.Conv2d):
            return layer.in_channels
    raise ValueError(f"{type(module).__name__} has no Conv2d")
