"""Behaviour of the pretext methods, the shared self-supervised evaluation and the supervised
baseline/probe: each test pins one thing that makes the method *that* method (what is hidden
from the network, what it must predict, where gradient flows, which split a number comes from).

Every expected value is rebuilt here from the method's written description in plain torch
(rotations by transpose + flip, tiles found by searching the image, CIE Lab written out,
the rebalanced cross-entropy written out, kNN as a loop) and compared with what the module
returns; none is produced by the code under test. Randomness is either replaced by a
deterministic stand-in (the flip/shift augmentation) or read back from what the backbone was
actually given (jigsaw tiles, the corrupted images) and checked against the description.
"""

from __future__ import annotations

import copy
import math

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import ssl_modules.evaluation.self_supervised as self_supervised
import ssl_modules.supervised as supervised
from ssl_modules import (
    ColorizationPretext,
    DenoisingAutoencoder,
    JigsawPretext,
    RotationPretext,
    SupervisedModule,
)
from ssl_modules.augment.pretext import lab_to_rgb
from ssl_modules.batch import UnlabeledBatch, train_batch

GRAY = {"num_classes": 3, "channels": 1, "mean": (0.3,), "std": (0.4,), "horizontal_flip": False}
RGB = {
    "num_classes": 3,
    "channels": 3,
    "mean": (0.4, 0.5, 0.6),
    "std": (0.2, 0.25, 0.3),
    "horizontal_flip": False,
}


# -- helpers ------------------------------------------------------------------------------


class Shift(nn.Module):
    """A deterministic stand-in for the random flip/shift augmentation (a fixed cyclic shift)."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return images.roll(shifts=(1, -2), dims=(-2, -1))


def normalise(images: torch.Tensor, facts: dict) -> torch.Tensor:
    mean = torch.tensor(facts["mean"]).view(1, -1, 1, 1)
    std = torch.tensor(facts["std"]).view(1, -1, 1, 1)
    return (images - mean) / std


def batch_of(channels: int, size: int, n_labeled: int = 4, n_unlabeled: int = 4, seed: int = 0) -> dict:
    """A hand-built batch; the hidden labels differ from anything a correct loss reads."""
    generator = torch.Generator().manual_seed(seed)
    labeled = torch.rand(n_labeled, channels, size, size, generator=generator)
    unlabeled = torch.rand(n_unlabeled, channels, size, size, generator=generator)
    return train_batch(
        labeled,
        torch.arange(n_labeled) % 3,
        unlabeled,
        torch.randint(0, 3, (n_unlabeled,), generator=generator),
    )


def record_backbone_inputs(model: nn.Module) -> list[torch.Tensor]:
    seen: list[torch.Tensor] = []
    model.backbone.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().clone()))
    return seen


def step(model: L.LightningModule, batch: dict) -> torch.Tensor:
    model.log = lambda *args, **kwargs: None  # no trainer attached
    return model.training_step(batch, 0)


def probe_loss_reference(model, images: torch.Tensor, labels: torch.Tensor, backbone_input) -> torch.Tensor:
    """The online probe's term: cross-entropy on features of the labeled images, no gradient to the backbone."""
    with torch.no_grad():
        features = model.backbone(backbone_input(images))
    return F.cross_entropy(model.online_probe(features), labels)


def assert_gradients_split(
    model, loss, pretext_reference, probe_reference, pretext_modules, rtol: float = 1e-4
) -> None:
    """The step's gradient is the pretext loss's gradient on the backbone and the pretext head,
    and the probe loss's gradient on the online probe: the probe sends nothing into the backbone,
    the pretext loss does."""
    groups = {"backbone": model.backbone, "online_probe": model.online_probe}
    groups.update({name: getattr(model, name) for name in pretext_modules})
    params = [p for module in groups.values() for p in module.parameters()]
    got = torch.autograd.grad(loss, params, allow_unused=True)
    from_pretext = torch.autograd.grad(pretext_reference, params, allow_unused=True, retain_graph=True)
    from_probe = torch.autograd.grad(probe_reference, params, allow_unused=True)
    index = 0
    for name, module in groups.items():
        for _ in module.parameters():
            expected = from_probe[index] if name == "online_probe" else from_pretext[index]
            assert expected is not None, f"the reference gives {name} no gradient"
            assert got[index] is not None, f"{name} gets no gradient from the step"
            torch.testing.assert_close(
                got[index],
                expected,
                rtol=rtol,
                atol=1e-6 * rtol / 1e-4,
                msg=lambda m, name=name: f"{name}: {m}",
            )
            index += 1
    backbone_grad = sum(g.abs().sum() for g in got[: len(list(model.backbone.parameters()))])
    assert backbone_grad > 0  # the pretext loss does train the backbone


# -- rotation -----------------------------------------------------------------------------


def rotate_ccw(image: torch.Tensor, quarter_turns: int) -> torch.Tensor:
    """Counter-clockwise by quarter_turns * 90 degrees, as transpose + flip (not torch.rot90)."""
    for _ in range(quarter_turns):
        image = image.transpose(-1, -2).flip(-2)
    return image


def test_rotation_step_is_4way_cross_entropy_over_every_rotation_of_every_view():
    # Hidden from the network: the orientation. Predicted: k for the image turned by k * 90 deg
    # counter-clockwise, for all four k, of every (augmented) labeled and unlabeled image.
    torch.manual_seed(0)
    facts = {**GRAY, "image_size": 8}
    model = RotationPretext(**facts, head_hidden=16)
    model.augment = Shift()
    batch = batch_of(1, 8)
    loss = step(model, batch)

    views = Shift()(torch.cat([batch["labeled"].images, batch["unlabeled"].images]))
    inputs, targets = [], []
    for image in views:  # image-major here, rotation-major in the module: the loss must not care
        for k in range(4):
            inputs.append(rotate_ccw(image, k))
            targets.append(k)
    logits = model.rotation_head(model.backbone(normalise(torch.stack(inputs), facts)))
    pretext = F.cross_entropy(logits, torch.tensor(targets))
    probe = probe_loss_reference(
        model, batch["labeled"].images, batch["labeled"].labels, lambda x: normalise(x, facts)
    )
    torch.testing.assert_close(loss, pretext + probe, rtol=1e-5, atol=1e-6)
    assert_gradients_split(model, loss, pretext, probe, ["rotation_head"])


def test_rotation_label_is_the_counter_clockwise_quarter_turn():
    # the single-pixel check of the direction: a bright top-right corner turned 90 deg ccw is top-left
    model = RotationPretext(**{**GRAY, "image_size": 8}, head_hidden=0)
    model.augment = nn.Identity()
    image = torch.zeros(1, 1, 8, 8)
    image[0, 0, 0, 7] = 1.0
    seen = record_backbone_inputs(model)
    step(model, train_batch(image, torch.zeros(1, dtype=torch.long)))
    bright = (seen[0] * 0.4 + 0.3) > 0.5  # undo the normalisation
    corners = {0: (0, 7), 1: (0, 0), 2: (7, 0), 3: (7, 7)}
    # the module puts rotation k at index k (rotation-major) and labels it k
    for k, (row, col) in corners.items():
        assert bright[k, 0, row, col] and bright[k].sum() == 1


# -- jigsaw -------------------------------------------------------------------------------


def _standardise(tile: torch.Tensor) -> torch.Tensor:
    return (tile - tile.mean()) / tile.std(unbiased=False)


def locate_tiles(images: torch.Tensor, tiles: torch.Tensor, cell: int, tile: int, slack: int):
    """For every puzzle position, the (source cell, row shift, col shift) whose standardised crop
    it is, searched over the whole allowed range. Shape: tiles (B, T, C, t, t) -> (B, T, 3)."""
    found = torch.empty(tiles.shape[0], tiles.shape[1], 3, dtype=torch.long)
    for n in range(len(images)):
        keys, crops = [], []
        for source in range(9):
            row, col = divmod(source, 3)
            for dr in range(slack + 1):
                for dc in range(slack + 1):
                    top, left = row * cell + dr, col * cell + dc
                    crops.append(_standardise(images[n, :, top : top + tile, left : left + tile]).flatten())
                    keys.append((source, dr, dc))
        # (T, candidates); a match is ~0 (up to the eps of the standardisation), the rest ~1 or more
        distance = torch.cdist(tiles[n].flatten(1), torch.stack(crops))
        for position in range(tiles.shape[1]):
            matches = (distance[position] < 2e-2).nonzero().flatten().tolist()
            assert len(matches) == 1, f"tile {position} of image {n} is no single crop of its image"
            found[n, position] = torch.tensor(keys[matches[0]])
    return found


def test_jigsaw_label_is_the_index_of_the_permutation_that_shuffled_the_tiles():
    # Hidden: where each tile came from. Predicted: which permutation of the fixed set put
    # tile perms[p][i] at position i. Every tile goes through the shared backbone alone; their
    # features are concatenated in puzzle order; tiles are jittered, smaller than their cells
    # and standardised one by one.
    torch.manual_seed(0)
    facts = {**GRAY, "image_size": 16}
    model = JigsawPretext(**facts, num_permutations=10, head_hidden=16)
    batch = batch_of(1, 16)
    seen = record_backbone_inputs(model)
    loss = step(model, batch)

    images = torch.cat([batch["labeled"].images, batch["unlabeled"].images])  # (8, 1, 16, 16)
    tiles = seen[0]
    # 16 px: cells of 16 // 3 = 5 px, tiles of 4 px (64/75 of a cell, at least 4): each tile is
    # an image of its own, not a stitched puzzle
    assert tiles.shape == (8 * 9, 1, 4, 4)
    # allowed shift inside a cell: grid slack (16 - 15) + tile slack (5 - 4)
    found = locate_tiles(images, tiles.view(8, 9, 1, 4, 4), cell=5, tile=4, slack=2)
    rows = {tuple(p.tolist()): index for index, p in enumerate(model.permutations)}
    labels = []
    for n in range(8):
        order = tuple(found[n, :, 0].tolist())
        assert order in rows, f"image {n}: tile order {order} is not in the permutation set"
        labels.append(rows[order])
    assert len(set(labels)) >= 3  # the permutation is drawn per image, not fixed
    shifts = {tuple(s.tolist()) for s in found[:, :, 1:].flatten(0, 1)}
    per_image = [len({tuple(s.tolist()) for s in found[n, :, 1:]}) for n in range(8)]
    assert len(shifts) > 1 and max(per_image) > 1  # jitter moves every tile on its own

    features = model.backbone(tiles).view(8, -1)  # tile features concatenated in puzzle order
    pretext = F.cross_entropy(model.jigsaw_head(features), torch.tensor(labels))
    # the probe reads whole (normalised) images, not tiles
    torch.testing.assert_close(seen[1], normalise(batch["labeled"].images, facts))
    probe = probe_loss_reference(
        model, batch["labeled"].images, batch["labeled"].labels, lambda x: normalise(x, facts)
    )
    torch.testing.assert_close(loss, pretext + probe, rtol=1e-5, atol=1e-6)
    assert_gradients_split(model, loss, pretext, probe, ["jigsaw_head"])


def test_jigsaw_permutation_set_is_a_max_min_hamming_set():
    model = JigsawPretext(**{**GRAY, "image_size": 16}, num_permutations=10)
    perms = model.permutations
    assert perms.shape == (10, 9)
    assert all(sorted(row.tolist()) == list(range(9)) for row in perms)
    distance = (perms[:, None] != perms[None]).sum(-1)
    distance.fill_diagonal_(10)
    # 10 permutations of 9 tiles cannot all differ everywhere (pigeonhole on one position: 9 is
    # impossible); the max-min set reaches 8, which none of 200 random sets of 10 reaches
    assert int(distance.min()) == 8
    generator = torch.Generator().manual_seed(0)
    best_random = 0
    for _ in range(200):
        random_set = torch.stack([torch.randperm(9, generator=generator) for _ in range(10)])
        d = (random_set[:, None] != random_set[None]).sum(-1)
        d.fill_diagonal_(10)
        best_random = max(best_random, int(d.min()))
    assert best_random < 8
    assert not torch.equal(
        JigsawPretext(**{**GRAY, "image_size": 16}, num_permutations=10, permutation_seed=1).permutations,
        perms,
    )


# -- colorization -------------------------------------------------------------------------


def lab_reference(rgb: torch.Tensor) -> torch.Tensor:
    """sRGB in [0, 1] -> CIE L*a*b* (D65, 2 degrees), the textbook formulas (classic constants)."""
    linear = torch.where(rgb > 0.04045, ((rgb + 0.055) / 1.055) ** 2.4, rgb / 12.92)
    to_xyz = torch.tensor(
        [[0.412453, 0.357580, 0.180423], [0.212671, 0.715160, 0.072169], [0.019334, 0.119193, 0.950227]]
    )
    xyz = torch.einsum("ij,bjhw->bihw", to_xyz, linear) / torch.tensor([0.95047, 1.0, 1.08883]).view(
        1, 3, 1, 1
    )
    f = torch.where(xyz > 0.008856, xyz.clamp_min(0.008856) ** (1 / 3), 7.787 * xyz + 16 / 116)
    return torch.stack([116 * f[:, 1] - 16, 500 * (f[:, 0] - f[:, 1]), 200 * (f[:, 1] - f[:, 2])], dim=1)


def block_mean(x: torch.Tensor, block: int) -> torch.Tensor:
    b, c, h, w = x.shape
    return x.view(b, c, h // block, block, w // block, block).mean(dim=(3, 5))


def rebalanced_cross_entropy(logits, ab, centres, counts, neighbours, sigma, lam):
    """Zhang et al. eq. 2 with the soft-encoded target and the smoothed-prior weights, written out."""
    pixels = ab.permute(0, 2, 3, 1).reshape(-1, 2)  # (P, 2)
    distance = ((pixels[:, None, :] - centres[None]) ** 2).sum(-1).sqrt()  # (P, Q)
    near, index = distance.sort(dim=1)
    gauss = torch.exp(-(near[:, :neighbours] ** 2) / (2 * sigma**2))
    target = torch.zeros_like(distance).scatter_(1, index[:, :neighbours], gauss / gauss.sum(1, keepdim=True))
    prior = counts / counts.sum()
    kernel = torch.exp(-((centres[:, None] - centres[None]) ** 2).sum(-1) / (2 * sigma**2))
    smoothed = kernel @ prior
    smoothed = smoothed / smoothed.sum()
    weights = 1 / ((1 - lam) * smoothed + lam / len(centres))
    weights = weights / (smoothed * weights).sum()
    log_p = F.log_softmax(logits.permute(0, 2, 3, 1).reshape(-1, len(centres)), dim=1)
    return (weights[index[:, 0]] * -(target * log_p).sum(1)).mean()


@pytest.mark.parametrize("loss_kind", ["classification", "regression"])
def test_colorization_sees_only_lightness_and_predicts_the_true_ab(loss_kind):
    # Hidden: the colour (ab). The backbone and the decoder's local input see only L; the
    # target is the ab of the same augmented image at 1/4 resolution: soft-encoded over the
    # in-gamut bins and reweighted by the smoothed running bin frequencies (classification),
    # or ab / 110 (regression).
    torch.manual_seed(0)
    facts = {**RGB, "image_size": 16}
    model = ColorizationPretext(
        **facts, loss=loss_kind, soft_neighbours=4, soft_sigma=6.0, rebalance_lambda=0.3, decoder_width=8
    )
    model.augment = Shift()
    counts_before = model.ab_bin_counts.clone()
    batch = batch_of(3, 16)
    seen = record_backbone_inputs(model)
    loss = step(model, batch)

    views = Shift()(torch.cat([batch["labeled"].images, batch["unlabeled"].images]))
    lab = lab_reference(views)
    lightness = lab[:, :1] / 50 - 1  # L in [0, 100] -> [-1, 1]
    assert seen[0].shape == (8, 1, 16, 16)
    torch.testing.assert_close(seen[0], lightness, atol=1e-4, rtol=0)
    ab = block_mean(lab[:, 1:], 4)  # (8, 2, 4, 4): the target at 1/output_stride
    output = model.decoder(model.backbone(seen[0]), block_mean(seen[0], 4))
    if loss_kind == "classification":
        centres = model.ab_centres
        nearest = ((ab.permute(0, 2, 3, 1).reshape(-1, 1, 2) - centres) ** 2).sum(-1).argmin(1)
        counts = counts_before + torch.bincount(nearest, minlength=len(centres)).float()
        torch.testing.assert_close(model.ab_bin_counts, counts)  # the prior counts this batch
        pretext = rebalanced_cross_entropy(output, ab, centres, counts, 4, 6.0, 0.3)
    else:
        pretext = ((output - ab / 110) ** 2).mean()
    probe = probe_loss_reference(
        model, batch["labeled"].images, batch["labeled"].labels, lambda x: lab_reference(x)[:, :1] / 50 - 1
    )
    torch.testing.assert_close(loss, pretext + probe, rtol=2e-4, atol=1e-5)
    assert_gradients_split(model, loss, pretext, probe, ["decoder"], rtol=2e-3)


def test_colorization_features_ignore_ab_and_follow_lightness():
    torch.manual_seed(0)
    model = ColorizationPretext(**{**RGB, "image_size": 16}, decoder_width=8).eval()
    lab = torch.cat(
        [torch.full((2, 1, 16, 16), 55.0) + 10 * torch.rand(2, 1, 16, 16), 8 * torch.rand(2, 2, 16, 16) - 4],
        1,
    )
    other_colour = torch.cat([lab[:, :1], lab[:, 1:].flip(1) * -1.5], 1)  # same L, other ab
    other_light = torch.cat([lab[:, :1] - 20, lab[:, 1:]], 1)  # same ab, other L
    rgb, rgb_colour, rgb_light = (lab_to_rgb(x) for x in (lab, other_colour, other_light))
    with torch.no_grad():
        features = model.embed(rgb)
        assert (features - model.embed(rgb_colour)).abs().max() < 1e-3 * features.abs().max()
        assert (features - model.embed(rgb_light)).abs().max() > 1e-2 * features.abs().max()
        # the decoder's prediction too depends on L alone: ab of the input cannot leak to the output
        output, target = model.predict_ab_output(lab)
        output_colour, target_colour = model.predict_ab_output(other_colour)
        torch.testing.assert_close(output, output_colour)
        assert not torch.allclose(target, target_colour)


# -- denoising autoencoder ----------------------------------------------------------------


def test_denoising_autoencoder_encodes_the_corrupted_image_and_regresses_the_clean_one():
    torch.manual_seed(0)
    facts = {**GRAY, "image_size": 8}
    model = DenoisingAutoencoder(**facts, mask_fraction=0.4, noise_std=0.05, decoder_width=8)
    batch = batch_of(1, 8)
    seen = record_backbone_inputs(model)
    loss = step(model, batch)
    clean = torch.cat([batch["labeled"].images, batch["unlabeled"].images])
    corrupted = seen[0] * 0.4 + 0.3
    assert (corrupted - clean).abs().mean() > 0.05  # the encoder did not see the clean image
    reconstruction = model.decoder(model.backbone(seen[0]))  # from the code vector alone
    pretext = ((reconstruction - normalise(clean, facts)) ** 2).mean()  # against the CLEAN image
    probe = probe_loss_reference(
        model, batch["labeled"].images, batch["labeled"].labels, lambda x: normalise(x, facts)
    )
    torch.testing.assert_close(loss, pretext + probe, rtol=1e-5, atol=1e-6)
    assert_gradients_split(model, loss, pretext, probe, ["decoder"])


def test_denoising_corruption_is_masking_noise_then_gaussian_noise_as_configured():
    torch.manual_seed(0)
    facts = {**RGB, "image_size": 16}
    clean = 0.1 + 0.9 * torch.rand(8, 3, 16, 16)  # no pixel is 0 before masking
    batch = train_batch(clean[:4], torch.arange(4) % 3, clean[4:], torch.zeros(4).long())
    mean, std = torch.tensor(facts["mean"]).view(1, 3, 1, 1), torch.tensor(facts["std"]).view(1, 3, 1, 1)

    masking = DenoisingAutoencoder(**facts, mask_fraction=0.3, noise_std=0.0, decoder_width=8)
    seen = record_backbone_inputs(masking)
    step(masking, batch)
    corrupted = seen[0] * std + mean
    kept = (corrupted - clean).abs().amax(1) < 1e-5  # (8, 16, 16): pixel equal in every channel
    masked = corrupted.abs().amax(1) < 1e-5  # zero in every channel
    assert bool((kept ^ masked).all())  # a pixel is kept or zeroed as a whole, nothing else
    assert abs(masked.float().mean().item() - 0.3) < 0.04  # about 2048 pixels: std 0.01
    assert not torch.equal(masked[0], masked[1])  # a fresh mask per image

    noisy = DenoisingAutoencoder(**facts, mask_fraction=0.0, noise_std=0.2, decoder_width=8)
    seen = record_backbone_inputs(noisy)
    step(noisy, batch)
    noise = seen[0] * std + mean - clean
    assert abs(noise.std().item() - 0.2) < 0.01 and abs(noise.mean().item()) < 0.01
    channels = noise.transpose(0, 1).flatten(1)
    assert torch.corrcoef(channels).fill_diagonal_(0).abs().max() < 0.1  # independent per element


# -- the shared evaluation (online probe / kNN / offline probe) and the supervised module ---


class SplitData(L.LightningDataModule):
    """Three distinguishable splits: labeled (6), validation (9, some labels flipped), test (12)."""

    def __init__(self, channels: int, size: int) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        prototypes = torch.rand(3, channels, size, size, generator=generator)

        def split(n: int, flipped: int = 0):
            labels = torch.arange(n) % 3
            noise = torch.rand(n, channels, size, size, generator=generator)
            images = 0.6 * prototypes[labels] + 0.4 * noise
            labels[:flipped] = (labels[:flipped] + 1) % 3
            return images, labels

        self.labeled, self.val, self.test = split(6), split(9, flipped=3), split(12, flipped=2)

    def labeled_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(*self.labeled), batch_size=4)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(*self.val), batch_size=4)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(*self.test), batch_size=5)


def _trainer() -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )


def knn_reference(query, bank, bank_labels, k, temperature=0.07):
    predictions = []
    for q in query:
        similarity = torch.stack([torch.dot(q, b) / (q.norm() * b.norm()) for b in bank])
        votes = torch.zeros(3)
        for j in similarity.argsort(descending=True)[:k].tolist():
            votes[bank_labels[j]] += math.exp(similarity[j] / temperature)
        predictions.append(votes.argmax())
    return torch.stack(predictions)


def accuracy(predicted: torch.Tensor, labels: torch.Tensor) -> float:
    return (predicted == labels).float().mean().item()


SELF_SUPERVISED = [
    (RotationPretext, GRAY, {"head_hidden": 8}, "normalise"),
    (JigsawPretext, GRAY, {"num_permutations": 4, "head_hidden": 8}, "normalise"),
    (ColorizationPretext, RGB, {"decoder_width": 8}, "lightness"),
    (DenoisingAutoencoder, GRAY, {"decoder_width": 8}, "normalise"),
]


@pytest.mark.parametrize(
    ("cls", "facts", "kwargs", "reads"), SELF_SUPERVISED, ids=[c[0].__name__ for c in SELF_SUPERVISED]
)
def test_scores_come_from_the_right_split(cls, facts, kwargs, reads, monkeypatch):
    # val/acc: the online probe on the validation images; val/knn_acc: kNN against the labeled
    # split; test/acc: a probe fitted on eval-mode features of the labeled split ONLY, applied
    # to the test images; the features the probe reads are the backbone on whole images
    # (colorization: on their lightness alone).
    torch.manual_seed(0)
    facts = {**facts, "image_size": 12}
    model = cls(**facts, knn_k=3, **kwargs)
    data = SplitData(facts["channels"], 12)
    if reads == "lightness":
        backbone_input = lambda x: lab_reference(x)[:, :1] / 50 - 1  # noqa: E731
    else:
        backbone_input = lambda x: normalise(x, facts)  # noqa: E731

    fitted = {}
    original = self_supervised.fit_linear_probe

    def recording_fit(features, labels, **options):
        fitted["features"], fitted["labels"] = features.clone(), labels.clone()
        fitted["probe"] = original(features, labels, **options)
        return fitted["probe"]

    monkeypatch.setattr(self_supervised, "fit_linear_probe", recording_fit)
    if cls is RotationPretext:
        # a random-init head predicts one rotation for every image, which scores 1/4 against any
        # labelling; this stand-in head (features standardised over the batch) varies per image
        width = model.backbone.num_features
        model.rotation_head = nn.Sequential(
            nn.BatchNorm1d(width, affine=False, track_running_stats=False), nn.Linear(width, 4)
        )
    validated = _trainer().validate(model, datamodule=data, verbose=False)[0]
    tested = _trainer().test(model, datamodule=data, verbose=False)[0]

    model.eval()
    with torch.no_grad():
        features = {
            name: model.backbone(backbone_input(x))
            for name, (x, _) in {"labeled": data.labeled, "val": data.val, "test": data.test}.items()
        }
        (_, labeled_y), (_, val_y), (_, test_y) = data.labeled, data.val, data.test
        torch.testing.assert_close(fitted["features"], features["labeled"], atol=1e-4, rtol=1e-4)
        assert torch.equal(fitted["labels"], labeled_y)

        online_val = accuracy(model.online_probe(features["val"]).argmax(1), val_y)
        knn_val = accuracy(knn_reference(features["val"], features["labeled"], labeled_y, k=3), val_y)
        offline_test = accuracy(fitted["probe"](features["test"]).argmax(1), test_y)
        online_test = accuracy(model.online_probe(features["test"]).argmax(1), test_y)
        knn_test = accuracy(knn_reference(features["test"], features["labeled"], labeled_y, k=3), test_y)
    assert knn_val < 1.0  # a bank holding the validation images themselves would score 1.0
    assert offline_test != online_test  # so the two probes cannot be confused
    assert validated["val/acc"] == pytest.approx(online_val, abs=1e-6)
    assert validated["val/knn_acc"] == pytest.approx(knn_val, abs=1e-6)
    assert tested["test/acc"] == pytest.approx(offline_test, abs=1e-6)
    assert tested["test/online_acc"] == pytest.approx(online_test, abs=1e-6)
    assert tested["test/knn_acc"] == pytest.approx(knn_test, abs=1e-6)
    if cls is RotationPretext:  # the validation pretext accuracy: all four turns of each image, label k
        with torch.no_grad():
            predicted, truth = [], []
            for x, _ in data.val_dataloader():  # the head normalises over a validation batch
                rotated = torch.cat([rotate_ccw(x, k) for k in range(4)])
                predicted.append(model.rotation_head(model.backbone(backbone_input(rotated))).argmax(1))
                truth.append(torch.arange(4).repeat_interleave(len(x)))
            predicted, truth = torch.cat(predicted), torch.cat(truth)
        assert accuracy(predicted, truth) != accuracy(predicted, 3 - truth)  # labels must matter
        assert validated["val/pretext_acc"] == pytest.approx(accuracy(predicted, truth), abs=1e-6)


def test_supervised_baseline_reads_only_the_labeled_batch():
    torch.manual_seed(0)
    facts = {**GRAY, "image_size": 8}
    model = SupervisedModule(**facts)
    model.augment = Shift()
    batch = batch_of(1, 8)
    loss = step(model, batch)
    images, labels, _ = batch["labeled"]
    expected = F.cross_entropy(model.classifier(model.backbone(normalise(Shift()(images), facts))), labels)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    # the unlabeled half (images and hidden labels) changes nothing
    other = {
        **batch,
        "unlabeled": UnlabeledBatch(torch.rand(7, 1, 8, 8), torch.randint(0, 3, (7,)), torch.arange(7)),
    }
    torch.testing.assert_close(step(model, other), expected, rtol=1e-5, atol=1e-6)
    loss.backward()
    assert all(p.grad is not None for p in model.backbone.parameters())  # the baseline trains its backbone


def test_frozen_backbone_is_a_linear_probe_on_fixed_eval_mode_features():
    torch.manual_seed(0)
    facts = {**GRAY, "image_size": 8}
    handed = []

    def optimizer(params):
        params = list(params)
        handed.extend(params)
        return torch.optim.SGD(params, lr=0.5, weight_decay=0.1)

    model = SupervisedModule(
        **facts, freeze_backbone=True, augment=False, optimizer=optimizer, scheduler=lambda opt: None
    )
    # a backbone with trained-looking BatchNorm statistics, so eval and train mode differ
    for bn in model.backbone.modules():
        if isinstance(bn, nn.BatchNorm2d):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
    model.train()
    assert not model.backbone.training  # the probe measures fixed features
    backbone_before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    classifier_before = model.classifier.weight.clone()
    optim = model.configure_optimizers()
    assert {id(p) for p in handed} == {id(p) for p in model.classifier.parameters()}

    eval_backbone = copy.deepcopy(model.backbone).eval()  # eval mode set here, not by the module
    batch = batch_of(1, 8)
    model.on_train_batch_start(batch, 0)  # what the Trainer calls before every step
    assert not model.backbone.training
    loss = step(model, batch)
    images, labels, _ = batch["labeled"]
    with torch.no_grad():
        features = eval_backbone(normalise(images, facts))
    expected = F.cross_entropy(model.classifier(features), labels)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    loss.backward()
    assert all(p.grad is None for p in model.backbone.parameters())
    optim = optim if isinstance(optim, torch.optim.Optimizer) else optim["optimizer"]
    optim.step()
    for key, value in model.backbone.state_dict().items():
        assert torch.equal(value, backbone_before[key]), f"{key} moved in a frozen backbone"
    assert not torch.equal(model.classifier.weight, classifier_before)


@pytest.mark.parametrize("freeze_backbone", [True, False])
def test_supervised_test_acc_is_the_offline_probe_on_the_labeled_split_when_frozen(
    freeze_backbone, monkeypatch
):
    torch.manual_seed(0)
    facts = {**GRAY, "image_size": 12}
    model = SupervisedModule(**facts, freeze_backbone=freeze_backbone, augment=False)
    data = SplitData(1, 12)
    fitted = {}
    original = supervised.fit_linear_probe

    def recording_fit(features, labels, **options):
        fitted["features"], fitted["labels"] = features.clone(), labels.clone()
        fitted["probe"] = original(features, labels, **options)
        return fitted["probe"]

    monkeypatch.setattr(supervised, "fit_linear_probe", recording_fit)
    validated = _trainer().validate(model, datamodule=data, verbose=False)[0]
    tested = _trainer().test(model, datamodule=data, verbose=False)[0]
    model.eval()
    with torch.no_grad():
        test_features = model.backbone(normalise(data.test[0], facts))
        classifier_test = accuracy(model.classifier(test_features).argmax(1), data.test[1])
        classifier_val = accuracy(
            model.classifier(model.backbone(normalise(data.val[0], facts))).argmax(1), data.val[1]
        )
        assert validated["val/acc"] == pytest.approx(classifier_val, abs=1e-6)
        if not freeze_backbone:  # the baseline: its own classifier, no probe
            assert not fitted
            assert tested["test/acc"] == pytest.approx(classifier_test, abs=1e-6)
            return
        torch.testing.assert_close(fitted["features"], model.backbone(normalise(data.labeled[0], facts)))
        assert torch.equal(fitted["labels"], data.labeled[1])
        offline_test = accuracy(fitted["probe"](test_features).argmax(1), data.test[1])
    assert offline_test != classifier_test
    assert tested["test/acc"] == pytest.approx(offline_test, abs=1e-6)
    assert tested["test/online_acc"] == pytest.approx(classifier_test, abs=1e-6)
