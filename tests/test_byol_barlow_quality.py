"""BYOL's asymmetric views and Barlow Twins' bias learning rate (issue 14, quality bar).

- solarization is BYOL's ``x 1{x < 0.5} + (1 - x) 1{x >= 0.5}`` on every channel
  -> ``test_solarize_matches_the_formula``;
- one draw per image decides whether the whole image is solarized, with probability ``p``
  -> ``test_solarize_decides_per_image_with_probability_p``;
- ``byol_views`` gives the paper's two view distributions (view 1 blur p=1.0, no solarization;
  view 2 blur p=0.1, solarization p=0.2; blur only where ``simclr_views`` blurs)
  -> ``test_byol_views_follow_the_paper_per_branch``;
- in ``BYOLModule(asymmetric_views=True)`` view 1 is never solarized and view 2 in ~20 % of the
  images, while the default keeps two draws of one augmentation
  -> ``test_asymmetric_views_differ_per_branch_in_the_module``, ``test_symmetric_byol_views_are_two_draws_of_one_augmentation``;
- Barlow Twins' biases and BatchNorm parameters step at ``lr x bias_lr_ratio`` outside LARS (the
  paper's 0.0048 at lr 0.2), the weights at ``lr`` with the trust ratio, the online probe at ``lr``
  -> ``test_barlow_twins_bias_lr``, ``test_barlow_twins_optimizer_step_follows_the_formula``;
- arguments are checked -> ``test_arguments_are_checked``.

- [0] BYOL, Grill et al., 2020, https://arxiv.org/abs/2006.07733
- [1] Barlow Twins, Zbontar et al., 2021, https://arxiv.org/abs/2103.03230
"""

from __future__ import annotations

import kornia.augmentation as K
import pytest
import torch

from ssl_modules import BarlowTwinsModule, BYOLModule
from ssl_modules.augment.views import RandomSolarize, byol_views, make_views

GRAY = dict(num_classes=3, channels=1, image_size=8, mean=(0.5,), std=(0.25,), horizontal_flip=False)
SMALL = dict(projection_hidden_dim=16, projection_dim=8)


def solarize_reference(images: torch.Tensor) -> torch.Tensor:
    """BYOL appendix B, element by element."""
    out = images.clone()
    flat_in, flat_out = images.flatten(), out.view(-1)
    for i in range(flat_in.numel()):
        x = float(flat_in[i])
        flat_out[i] = x if x < 0.5 else 1.0 - x
    return out


@pytest.mark.parametrize("channels", [1, 3])
def test_solarize_matches_the_formula(channels: int) -> None:
    torch.manual_seed(0)
    images = torch.rand(4, channels, 5, 5)
    images[0, 0, 0, :3] = torch.tensor([0.0, 0.5, 1.0])  # the threshold and the ends
    torch.testing.assert_close(RandomSolarize(p=1.0)(images), solarize_reference(images))
    torch.testing.assert_close(RandomSolarize(p=0.0)(images), images)


def test_solarize_decides_per_image_with_probability_p() -> None:
    torch.manual_seed(1)
    images = torch.full((4000, 3, 2, 2), 0.9)
    out = RandomSolarize(p=0.3)(images)
    solarized = (out - 0.1).abs().amax(dim=(1, 2, 3)) < 1e-6  # the whole image became 1 - 0.9
    untouched = (out - 0.9).abs().amax(dim=(1, 2, 3)) < 1e-6
    assert bool((solarized | untouched).all())  # never part of an image
    assert 0.27 < solarized.float().mean() < 0.33  # ~4 standard deviations around p


def pipeline_parts(augment: torch.nn.Module) -> dict[type, torch.nn.Module]:
    return {type(op): op for op in augment.children()}


def test_byol_views_follow_the_paper_per_branch() -> None:
    first, second = (pipeline_parts(augment) for augment in byol_views(3, 16, blur=True))
    assert first[K.RandomGaussianBlur].p == pytest.approx(1.0)
    assert RandomSolarize not in first
    assert second[K.RandomGaussianBlur].p == pytest.approx(0.1)
    assert second[RandomSolarize].p == pytest.approx(0.2)
    # the SimCLR part (crop, jitter, grayscale) is the same in both
    for part in first:
        if part is not K.RandomGaussianBlur:
            assert part in second
    # small images: blur follows simclr_views' rule (none below 64 px), solarization stays
    first, second = (pipeline_parts(augment) for augment in byol_views(1, 16))
    assert K.RandomGaussianBlur not in first and K.RandomGaussianBlur not in second
    assert RandomSolarize not in first and second[RandomSolarize].p == pytest.approx(0.2)


def solarized_fraction(view: torch.Tensor, value: float) -> tuple[float, float]:
    """Fractions of images that stayed at ``value`` and that became ``1 - value``."""
    kept = ((view - value).abs().amax(dim=(1, 2, 3)) < 1e-5).float().mean()
    flipped = ((view - (1 - value)).abs().amax(dim=(1, 2, 3)) < 1e-5).float().mean()
    return float(kept), float(flipped)


def test_asymmetric_views_differ_per_branch_in_the_module() -> None:
    # constant images, no jitter: crops leave them unchanged, so only solarization shows
    images = torch.full((2000, 1, 8, 8), 0.8)
    torch.manual_seed(2)
    model = BYOLModule(**GRAY, **SMALL, jitter_strength=0.0, asymmetric_views=True)
    view_1, view_2 = model.make_views(images)
    assert solarized_fraction(view_1, 0.8) == (1.0, 0.0)  # view 1: never solarized
    kept, flipped = solarized_fraction(view_2, 0.8)
    assert kept + flipped == pytest.approx(1.0) and 0.17 < flipped < 0.23  # view 2: p = 0.2
    symmetric = BYOLModule(**GRAY, **SMALL, jitter_strength=0.0, asymmetric_views=False)
    for view in symmetric.make_views(images):
        assert solarized_fraction(view, 0.8) == (1.0, 0.0)


def test_byol_views_are_the_papers_asymmetric_ones_by_default() -> None:
    model = BYOLModule(**GRAY, **SMALL)
    assert model.hparams.asymmetric_views is True and model.view_augments is not None


def test_symmetric_byol_views_are_two_draws_of_one_augmentation() -> None:
    model = BYOLModule(**GRAY, **SMALL, asymmetric_views=False)
    assert model.view_augments is None
    images = torch.rand(6, 1, 8, 8)
    torch.manual_seed(3)
    views = model.make_views(images)
    torch.manual_seed(3)
    expected = make_views(images, model.augment, 2)
    for view, reference in zip(views, expected):
        assert torch.equal(view, reference)


def barlow(**kwargs) -> BarlowTwinsModule:
    torch.manual_seed(0)
    return BarlowTwinsModule(**GRAY, **SMALL, **kwargs)


def lr_of(optimizer: torch.optim.Optimizer) -> dict[int, tuple[float, bool]]:
    """id(parameter) -> (lr, LARS-excluded) of its group."""
    return {
        id(parameter): (group["lr"], group["lars_exclude"])
        for group in optimizer.param_groups
        for parameter in group["params"]
    }


def test_barlow_twins_bias_lr() -> None:
    model = barlow(lr=0.2, bias_lr_ratio=0.024)
    groups = lr_of(model.default_optimizer(model.trainable_parameters()))
    probe = {id(p) for p in model.online_probe.parameters()}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        if id(parameter) in probe:
            assert groups[id(parameter)] == (pytest.approx(0.2), True), name
        elif parameter.ndim < 2:  # biases and BatchNorm parameters: the paper's 0.0048, no LARS
            assert groups[id(parameter)] == (pytest.approx(0.0048), True), name
        else:
            assert groups[id(parameter)] == (pytest.approx(0.2), False), name
    # the ratio 1.0 reproduces the optimizer from before the argument: every group at lr
    model = barlow(lr=0.2, bias_lr_ratio=1.0)
    groups = lr_of(model.default_optimizer(model.trainable_parameters()))
    assert all(lr == pytest.approx(0.2) for lr, _ in groups.values())


def test_barlow_twins_optimizer_step_follows_the_formula() -> None:
    lr, ratio, weight_decay, eta = 0.5, 0.024, 1e-2, 1e-3
    model = barlow(lr=lr, bias_lr_ratio=ratio, weight_decay=weight_decay)
    optimizer = model.default_optimizer(model.trainable_parameters())
    torch.manual_seed(4)
    for parameter in model.parameters():
        parameter.grad = torch.randn_like(parameter)
    bias = model.projector.layers[1].bias  # a BatchNorm parameter
    weight = model.projector.layers[0].weight
    probe = model.online_probe.weight
    before = {
        name: (p.detach().clone(), p.grad.clone()) for name, p in [("b", bias), ("w", weight), ("p", probe)]
    }
    optimizer.step()
    # first step: the momentum buffer is the update itself
    b, g = before["b"]
    torch.testing.assert_close(bias.detach(), b - lr * ratio * g)  # no weight decay, no trust ratio
    w, g = before["w"]
    update = g + weight_decay * w
    trust = eta * float(w.norm()) / float(update.norm())
    torch.testing.assert_close(weight.detach(), w - lr * trust * update)
    p, g = before["p"]
    torch.testing.assert_close(probe.detach(), p - lr * g)  # the online probe keeps lr


def test_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match="bias_lr_ratio"):
        barlow(bias_lr_ratio=0.0)
    with pytest.raises(ValueError, match="probability"):
        RandomSolarize(p=1.5)
    with pytest.raises(ValueError, match="threshold"):
        RandomSolarize(threshold=2.0)
