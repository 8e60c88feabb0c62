"""FlexMatch's and FreeMatch's pseudo-label rules against their papers' formulas, written out here.

- FlexMatch (Zhang et al., 2021, https://arxiv.org/abs/2110.08263): learning status per
  unlabeled image, keyed by ``index``; ``T(c) = M(beta(c)) tau`` with warm-up and the convex or
  linear mapping; thresholds from the status before the batch, then the status update (TorchSSL
  / USB order).
- FreeMatch (Wang et al., 2023, https://arxiv.org/abs/2205.07246): EMAs ``tau_t``, ``p_t``,
  ``h_t``; ``tau_t(c) = MaxNorm(p_t)(c) tau_t``; the self-adaptive fairness loss.

The references are plain Python loops over lists. DDP is simulated with two threads sharing a
fake ``torch.distributed`` (all_gather / all_reduce over a barrier): no process group.
"""

from __future__ import annotations

import math
import threading
from typing import Any

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from ssl_modules import FixMatchModule
from ssl_modules.batch import train_batch
from ssl_modules.semi_supervised.rules.base import (
    DistributionAlignment,
    PseudoLabels,
    build_rule,
    rule_record,
)
from ssl_modules.semi_supervised.rules.flexmatch import FlexMatchThreshold
from ssl_modules.semi_supervised.rules.freematch import FreeMatchThreshold

CLASSES = 3


def random_probs(count: int, seed: int, scale: float = 3.0, classes: int = CLASSES) -> torch.Tensor:
    """Rows on the simplex with confidences spread over (1/C, 1). Shape: (count, classes)."""
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(count, classes, generator=generator) * scale).softmax(dim=1)


# -- FlexMatch: the reference --------------------------------------------------------------
class FlexReference:
    """Curriculum Pseudo Labeling in plain Python (Zhang et al., 2021, Sec. 3.2-3.3)."""

    def __init__(self, num_samples: int, tau: float, warmup: bool, mapping: str) -> None:
        self.status = [-1] * num_samples
        self.tau, self.warmup, self.mapping = tau, warmup, mapping

    def thresholds(self) -> list[float]:
        sigma = [sum(1 for s in self.status if s == c) for c in range(CLASSES)]
        unused = sum(1 for s in self.status if s == -1)
        denominator = max(max(sigma), unused) if self.warmup else max(sigma)
        beta = [s / denominator if denominator > 0 else 0.0 for s in sigma]
        mapped = [b / (2 - b) for b in beta] if self.mapping == "convex" else beta
        return [self.tau * m for m in mapped]

    def step(self, probs: list[list[float]], index: list[int]) -> tuple[list[int], list[float]]:
        thresholds = self.thresholds()  # before this batch's update
        labels, weights = [], []
        for row in probs:
            confidence = max(row)
            label = row.index(confidence)
            labels.append(label)
            weights.append(1.0 if confidence >= thresholds[label] else 0.0)
        for row, i in zip(probs, index):
            if max(row) >= self.tau:
                self.status[i] = row.index(max(row))
        return labels, weights


def flex_batches(
    num_samples: int, steps: int, batch: int, seed: int = 0
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    out = []
    for step in range(steps):
        index = torch.randperm(num_samples, generator=generator)[:batch]
        out.append((random_probs(batch, seed * 100 + step), index))
    return out


# -- FlexMatch ----------------------------------------------------------------------------
@pytest.mark.parametrize("warmup", [True, False])
@pytest.mark.parametrize("mapping", ["convex", "linear"])
def test_flexmatch_thresholds_and_masks_follow_the_formula_over_updates(warmup: bool, mapping: str) -> None:
    tau, num_samples = 0.8, 12
    rule = FlexMatchThreshold(threshold=tau, warmup=warmup, mapping=mapping).train()
    rule.allocate(CLASSES, num_samples)
    reference = FlexReference(num_samples, tau, warmup, mapping)
    kept_below_tau = 0
    for probs, index in flex_batches(num_samples, steps=8, batch=5):
        pseudo = rule(probs, index)
        labels, weights = reference.step(probs.tolist(), index.tolist())
        assert pseudo.targets.tolist() == labels
        assert pseudo.weights.tolist() == weights
        assert rule.status.tolist() == reference.status
        assert rule.class_thresholds().tolist() == pytest.approx(reference.thresholds(), abs=1e-6)
        kept_below_tau += int(((probs.max(dim=1).values < tau) & (pseudo.weights > 0)).sum())
    assert kept_below_tau > 0, "the flexible thresholds never let pass an image FixMatch would drop"
    assert -1 in reference.status and len(set(reference.status)) > 2  # a mixed status was exercised


def test_flexmatch_thresholds_closed_form_warmup_and_mapping() -> None:
    """Status: 3 x class 0, 1 x class 1, none of class 2, 4 unused (tau 0.9).
    Warm-up: beta = (3, 1, 0) / max(3, 4) = (0.75, 0.25, 0); without: (3, 1, 0) / 3."""
    status = torch.tensor([0, 0, 0, 1, -1, -1, -1, -1])
    expected = {
        (True, "convex"): [0.9 * 0.75 / 1.25, 0.9 * 0.25 / 1.75, 0.0],
        (True, "linear"): [0.9 * 0.75, 0.9 * 0.25, 0.0],
        (False, "convex"): [0.9, 0.9 * (1 / 3) / (5 / 3), 0.0],
        (False, "linear"): [0.9, 0.9 / 3, 0.0],
    }
    for (warmup, mapping), thresholds in expected.items():
        rule = FlexMatchThreshold(threshold=0.9, warmup=warmup, mapping=mapping)
        rule.allocate(CLASSES, len(status))
        rule.status.copy_(status)
        assert rule.class_thresholds().tolist() == pytest.approx(thresholds, abs=1e-6), (warmup, mapping)
    # nothing learnt yet: every threshold 0, with or without warm-up (everything passes)
    for warmup in (True, False):
        rule = FlexMatchThreshold(warmup=warmup)
        rule.allocate(CLASSES, 5)
        assert rule.class_thresholds().tolist() == [0.0] * CLASSES


def test_flexmatch_decides_with_the_status_before_the_batch() -> None:
    """An image that turns class 0 confident in this batch does not raise class 0's threshold for
    this batch's own decisions (TorchSSL / USB order), only for the next batch's."""
    rule = FlexMatchThreshold(threshold=0.9).train()
    rule.allocate(CLASSES, 2)  # all unused: thresholds 0
    probs = torch.tensor([[0.95, 0.03, 0.02], [0.5, 0.3, 0.2]])
    pseudo = rule(probs, torch.tensor([0, 1]))
    assert pseudo.weights.tolist() == [1.0, 1.0]  # T = 0 for all: both pass
    assert rule.status.tolist() == [0, -1]
    # after the update beta(0) = 1 / max(1, 1) = 1, T(0) = 0.9: the same image now fails
    assert rule.class_thresholds().tolist() == pytest.approx([0.9, 0.0, 0.0])
    pseudo = rule(probs[1:], torch.tensor([1]))
    assert pseudo.weights.tolist() == [0.0]


def test_flexmatch_unconfident_images_keep_their_status() -> None:
    rule = FlexMatchThreshold(threshold=0.9).train()
    rule.allocate(CLASSES, 3)
    rule(torch.tensor([[0.02, 0.95, 0.03]]), torch.tensor([2]))
    assert rule.status.tolist() == [-1, -1, 1]
    rule(torch.tensor([[0.6, 0.3, 0.1]]), torch.tensor([2]))  # below tau: kept, not reset to -1
    assert rule.status.tolist() == [-1, -1, 1]
    rule(torch.tensor([[0.01, 0.01, 0.98]]), torch.tensor([2]))  # confident again: overwritten
    assert rule.status.tolist() == [-1, -1, 2]


def test_flexmatch_update_is_keyed_by_index_not_position() -> None:
    probs = random_probs(6, seed=3, scale=5.0)
    index = torch.tensor([7, 2, 9, 0, 5, 4])
    order = torch.tensor([3, 0, 5, 1, 4, 2])
    a = FlexMatchThreshold(threshold=0.8).train()
    b = FlexMatchThreshold(threshold=0.8).train()
    for rule in (a, b):
        rule.allocate(CLASSES, 10)
    first = a(probs, index)
    second = b(probs[order], index[order])
    assert torch.equal(a.status, b.status)
    assert (a.status >= 0).sum() >= 2  # some images were written
    assert torch.equal(first.weights[order], second.weights)
    # the status holds each image's own prediction at its own index
    confident = probs.max(dim=1).values >= 0.8
    assert a.status[index[confident]].tolist() == probs.argmax(dim=1)[confident].tolist()


def test_flexmatch_eval_mode_does_not_update() -> None:
    rule = FlexMatchThreshold(threshold=0.8)
    rule.allocate(CLASSES, 10)
    rule.status[:4] = torch.tensor([0, 0, 1, 2])
    before = rule.status.clone()
    rule.eval()
    probs = random_probs(6, seed=4, scale=6.0)
    assert (probs.max(dim=1).values >= 0.8).any()  # a training batch would write
    pseudo = rule(probs, torch.arange(4, 10))
    assert torch.equal(rule.status, before)
    thresholds = FlexReference(10, 0.8, True, "convex")
    thresholds.status = before.tolist()
    expected = [1.0 if max(r) >= thresholds.thresholds()[r.index(max(r))] else 0.0 for r in probs.tolist()]
    assert pseudo.weights.tolist() == expected


def test_flexmatch_state_is_checkpointed_and_resumes_exactly() -> None:
    batches = flex_batches(12, steps=8, batch=5, seed=1)
    uninterrupted = FlexMatchThreshold(threshold=0.8).train()
    uninterrupted.allocate(CLASSES, 12)
    expected = [uninterrupted(p, i) for p, i in batches]

    first = FlexMatchThreshold(threshold=0.8).train()
    first.allocate(CLASSES, 12)
    got = [first(p, i) for p, i in batches[:4]]
    state = first.state_dict()
    assert set(state) == {"status"} and (state["status"] >= 0).any()
    resumed = FlexMatchThreshold(threshold=0.8).train()  # fresh: not allocated
    resumed.load_state_dict(state)
    got += [resumed(p, i) for p, i in batches[4:]]
    for a, b in zip(got, expected):
        assert torch.equal(a.targets, b.targets) and torch.equal(a.weights, b.weights)
    assert torch.equal(resumed.status, uninterrupted.status)
    # allocating with the same unlabeled set keeps the loaded status (what fitting does on resume)
    resumed.allocate(CLASSES, 12)
    assert torch.equal(resumed.status, uninterrupted.status)


def test_flexmatch_needs_the_unlabeled_set_size_and_indices() -> None:
    rule = FlexMatchThreshold().train()
    rule.allocate(CLASSES, None)
    with pytest.raises(ValueError, match="size of the\\s+unlabeled set"):
        rule(random_probs(2, 0), torch.tensor([0, 1]))
    rule.allocate(CLASSES, 4)
    with pytest.raises(ValueError, match="index"):
        rule(random_probs(2, 0), None)
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        rule(random_probs(2, 0), torch.tensor([1, 4]))
    with pytest.raises(ValueError, match="mapping"):
        FlexMatchThreshold(mapping="concave")
    with pytest.raises(ValueError, match="threshold"):
        FlexMatchThreshold(threshold=1.5)
    allocated = FlexMatchThreshold()
    allocated.allocate(CLASSES, 5)
    with pytest.raises(ValueError, match="unlabeled set differs"):
        allocated.load_state_dict(rule.state_dict())


def test_flexmatch_log_values() -> None:
    rule = FlexMatchThreshold(threshold=0.9)
    rule.allocate(CLASSES, 8)
    rule.status.copy_(torch.tensor([0, 0, 0, 1, -1, -1, -1, -1]))
    values = rule.log_values()
    assert set(values) == {"threshold/c0", "threshold/c1", "threshold/c2", "unused_fraction"}
    assert values["threshold/c0"].item() == pytest.approx(0.9 * 0.75 / 1.25)
    assert values["unused_fraction"].item() == pytest.approx(0.5)


# -- FreeMatch: the reference --------------------------------------------------------------
class FreeReference:
    """Self-adaptive thresholding in plain Python (Wang et al., 2023, Eq. 5-7 and Algorithm 1)."""

    def __init__(self, momentum: float) -> None:
        self.momentum = momentum
        self.tau = 1 / CLASSES
        self.p = [1 / CLASSES] * CLASSES
        self.h = [1 / CLASSES] * CLASSES

    def thresholds(self) -> list[float]:
        return [self.p[c] / max(self.p) * self.tau for c in range(CLASSES)]

    def step(self, probs: list[list[float]]) -> tuple[list[int], list[float]]:
        m, n = self.momentum, len(probs)
        self.tau = m * self.tau + (1 - m) * sum(max(row) for row in probs) / n
        self.p = [m * self.p[c] + (1 - m) * sum(row[c] for row in probs) / n for c in range(CLASSES)]
        labels = [row.index(max(row)) for row in probs]
        self.h = [m * self.h[c] + (1 - m) * labels.count(c) / n for c in range(CLASSES)]
        thresholds = self.thresholds()  # after this batch's update
        weights = [1.0 if max(row) >= thresholds[label] else 0.0 for row, label in zip(probs, labels)]
        return labels, weights


def fairness_reference(
    strong_logits: torch.Tensor, weights: list[float], p_t: list[float], h_t: list[float], weight: float
) -> torch.Tensor:
    """``w_f * sum_c a_c log(b_c + 1e-12)``, a = SumNorm(p_t / h_t), b = SumNorm(p_bar / h_bar) over
    the kept images, with 1/0 -> 0 and no gradient through the histograms (Wang et al., 2023, Eq. 8-11)."""
    kept = [b for b, w in enumerate(weights) if w > 0]
    if not kept:
        return strong_logits.sum() * 0.0
    rows = [strong_logits[b].softmax(dim=0) for b in kept]
    p_bar = [sum(row[c] for row in rows) / len(rows) for c in range(CLASSES)]
    predicted = [int(row.argmax()) for row in rows]
    h_bar = [predicted.count(c) / len(rows) for c in range(CLASSES)]
    a = [p_t[c] / h_t[c] if h_t[c] > 0 else 0.0 for c in range(CLASSES)]
    a = [x / sum(a) for x in a]
    b = [p_bar[c] / h_bar[c] if h_bar[c] > 0 else p_bar[c] * 0.0 for c in range(CLASSES)]
    total = sum(b)
    return weight * sum(a[c] * torch.log(b[c] / total + 1e-12) for c in range(CLASSES))


# -- FreeMatch ----------------------------------------------------------------------------
def test_freematch_thresholds_and_masks_follow_the_formula_over_updates() -> None:
    momentum = 0.7  # a short EMA so that a few steps move the thresholds far from 1/C
    rule = FreeMatchThreshold(momentum=momentum).train()
    reference = FreeReference(momentum)
    kept, dropped = 0, 0
    for step in range(8):
        probs = random_probs(6, seed=10 + step, scale=2.0 + step)  # growing confidence
        probs[:, 0] *= 2  # an easy class: p_t(0) leads, the other classes get lower thresholds
        probs = probs / probs.sum(dim=1, keepdim=True)
        pseudo = rule(probs, None)
        labels, weights = reference.step(probs.tolist())
        assert pseudo.targets.tolist() == labels
        assert pseudo.weights.tolist() == weights
        assert rule.global_threshold.item() == pytest.approx(reference.tau, abs=1e-6)
        assert rule.class_probs.tolist() == pytest.approx(reference.p, abs=1e-6)
        assert rule.label_histogram.tolist() == pytest.approx(reference.h, abs=1e-6)
        assert rule.class_thresholds().tolist() == pytest.approx(reference.thresholds(), abs=1e-6)
        kept, dropped = kept + sum(weights), dropped + len(weights) - sum(weights)
    assert kept > 0 and dropped > 0
    thresholds = reference.thresholds()
    assert min(thresholds) < max(thresholds) == pytest.approx(reference.tau)  # per-class, MaxNorm


def test_freematch_initial_state_and_eval_mode() -> None:
    rule = FreeMatchThreshold()
    rule.allocate(4)
    assert rule.global_threshold.item() == pytest.approx(0.25)
    assert rule.class_probs.tolist() == [0.25] * 4 and rule.label_histogram.tolist() == [0.25] * 4
    rule.eval()
    before = {k: v.clone() for k, v in rule.state_dict().items()}
    pseudo = rule(random_probs(5, 0, classes=4), None)
    for key, value in rule.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert pseudo.weights.tolist() == [1.0] * 5  # tau_0(c) = 1/C <= every max prob


def test_freematch_state_is_checkpointed_and_resumes_exactly() -> None:
    batches = [random_probs(6, seed=20 + s, scale=3.0) for s in range(8)]
    uninterrupted = FreeMatchThreshold(momentum=0.8).train()
    expected = [uninterrupted(p, None) for p in batches]
    first = FreeMatchThreshold(momentum=0.8).train()
    got = [first(p, None) for p in batches[:4]]
    state = first.state_dict()
    assert set(state) == {"global_threshold", "class_probs", "label_histogram"}
    resumed = FreeMatchThreshold(momentum=0.8).train()
    resumed.load_state_dict(state)
    got += [resumed(p, None) for p in batches[4:]]
    for a, b in zip(got, expected):
        assert torch.equal(a.targets, b.targets) and torch.equal(a.weights, b.weights)
    for key, value in uninterrupted.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), key


def test_freematch_fairness_loss_matches_the_formula_value_and_gradient() -> None:
    rule = FreeMatchThreshold(momentum=0.6, fairness_weight=0.3).train()
    for step in range(3):
        rule(random_probs(8, seed=30 + step, scale=3.0), None)
    strong = torch.randn(8, CLASSES, generator=torch.Generator().manual_seed(5)) * 2
    strong[:, 2] -= 10  # class 2 never the strong argmax: its 1/h_bar is 0
    weights = torch.tensor([1.0, 0, 1, 1, 0, 1, 1, 0])
    pseudo_targets = torch.zeros(8, dtype=torch.long)
    for h_t in (None, [0.5, 0.5, 0.0]):  # h_t with an empty class: 1/h_t -> 0
        if h_t is not None:
            rule.label_histogram.copy_(torch.tensor(h_t))
        a = strong.clone().requires_grad_(True)
        b = strong.clone().requires_grad_(True)
        loss = rule.extra_loss(a, PseudoLabels(pseudo_targets, weights))
        expected = fairness_reference(
            b, weights.tolist(), rule.class_probs.tolist(), rule.label_histogram.tolist(), 0.3
        )
        assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
        (grad_a,) = torch.autograd.grad(loss, a)
        (grad_b,) = torch.autograd.grad(expected, b)
        assert torch.allclose(grad_a, grad_b, atol=1e-6)
        assert grad_a.abs().sum() > 0
        assert grad_a[weights == 0].abs().sum() == 0  # dropped images do not enter


def test_freematch_fairness_loss_closed_form_and_empty_mask() -> None:
    rule = FreeMatchThreshold(fairness_weight=0.5)
    rule.allocate(CLASSES)  # p_t, h_t uniform: the target is uniform
    strong = (2.0 * torch.eye(CLASSES)).requires_grad_(True)  # one image per class: p_bar, h_bar uniform
    ones = torch.ones(CLASSES)
    loss = rule.extra_loss(strong, PseudoLabels(torch.arange(3), ones))
    assert loss.item() == pytest.approx(0.5 * -math.log(CLASSES), rel=1e-6)  # -H(uniform, uniform)
    none = rule.extra_loss(strong, PseudoLabels(torch.arange(3), torch.zeros(3)))
    (grad,) = torch.autograd.grad(none, strong)
    assert none.item() == 0.0 and torch.all(grad == 0) and torch.isfinite(grad).all()
    assert FreeMatchThreshold(fairness_weight=0.0).extra_loss(strong, None) is None  # type: ignore[arg-type]


def test_freematch_fairness_gradient_reaches_the_strong_logits_only() -> None:
    rule = FreeMatchThreshold(momentum=0.5).train()
    weak = (torch.randn(6, CLASSES, generator=torch.Generator().manual_seed(1)) * 3).requires_grad_(True)
    strong = torch.randn(6, CLASSES, generator=torch.Generator().manual_seed(2)).requires_grad_(True)
    pseudo = rule(weak.softmax(dim=1), None)
    assert pseudo.weights.sum() > 0
    loss = rule.extra_loss(strong, pseudo)
    grad_strong, grad_weak = torch.autograd.grad(loss, [strong, weak], allow_unused=True)
    assert grad_weak is None
    assert grad_strong is not None and grad_strong.abs().sum() > 0
    assert not any(buffer.requires_grad for buffer in rule.buffers())


def test_freematch_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match="momentum"):
        FreeMatchThreshold(momentum=1.2)
    with pytest.raises(ValueError, match="fairness_weight"):
        FreeMatchThreshold(fairness_weight=-0.1)


def test_freematch_log_values() -> None:
    rule = FreeMatchThreshold()
    rule.allocate(CLASSES)
    rule.class_probs.copy_(torch.tensor([0.5, 0.25, 0.25]))
    rule.global_threshold.fill_(0.8)
    values = rule.log_values()
    assert set(values) == {"global_threshold", "threshold/c0", "threshold/c1", "threshold/c2"}
    assert values["global_threshold"].item() == pytest.approx(0.8)
    assert [values[f"threshold/c{k}"].item() for k in range(3)] == pytest.approx([0.8, 0.4, 0.4])


# -- DDP: two ranks simulated by two threads ---------------------------------------------------
class FakeGroup:
    """``all_gather`` / ``all_reduce`` (sum) between threads; a thread's rank is thread-local."""

    def __init__(self, world_size: int = 2) -> None:
        self.world_size = world_size
        self.barrier = threading.Barrier(world_size, timeout=20)
        self.local = threading.local()
        self.slots: list[Any] = [None] * world_size

    def get_rank(self, group: Any = None) -> int:
        return self.local.rank

    def _exchange(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        self.slots[self.local.rank] = tensor.detach().clone()
        self.barrier.wait()
        values = list(self.slots)
        self.barrier.wait()  # every rank has read before anyone writes again
        return values

    def all_gather(self, parts: list[torch.Tensor], tensor: torch.Tensor, *args: Any, **kwargs: Any) -> None:
        for part, value in zip(parts, self._exchange(tensor)):
            part.copy_(value)

    def all_reduce(self, tensor: torch.Tensor, *args: Any, **kwargs: Any) -> None:
        tensor.copy_(torch.stack(self._exchange(tensor)).sum(dim=0))

    def run(self, fns: list[Any]) -> list[Any]:
        results: list[Any] = [None] * self.world_size
        errors: list[BaseException] = []

        def work(rank: int) -> None:
            self.local.rank = rank
            try:
                results[rank] = fns[rank]()
            except BaseException as error:  # noqa: BLE001 - re-raised in the main thread
                errors.append(error)
                self.barrier.abort()

        threads = [threading.Thread(target=work, args=(r,)) for r in range(self.world_size)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if errors:
            raise errors[0]
        return results


@pytest.fixture
def two_ranks(monkeypatch: pytest.MonkeyPatch) -> FakeGroup:
    import torch.distributed as dist

    group = FakeGroup(2)
    monkeypatch.setattr(dist, "is_available", lambda: True)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(dist, "get_rank", group.get_rank)
    monkeypatch.setattr(dist, "all_gather", group.all_gather)
    monkeypatch.setattr(dist, "all_reduce", group.all_reduce)
    return group


def test_flexmatch_ranks_hold_the_status_of_the_global_batch(two_ranks: FakeGroup) -> None:
    ranks = [FlexMatchThreshold(threshold=0.8).train() for _ in range(2)]
    single = FlexMatchThreshold(threshold=0.8).train()
    for rule in [*ranks, single]:
        rule.allocate(CLASSES, 16)
    generator = torch.Generator().manual_seed(0)
    for step in range(4):
        index = torch.randperm(16, generator=generator)[:8]
        probs = random_probs(8, seed=40 + step, scale=4.0)
        shards = [(probs[:4], index[:4]), (probs[4:], index[4:])]
        decisions = two_ranks.run([lambda r=r, shards=shards: ranks[r](*shards[r]) for r in range(2)])
        with pytest.MonkeyPatch.context() as patch:  # one process seeing the whole batch
            import torch.distributed as dist

            patch.setattr(dist, "is_initialized", lambda: False)
            whole = single(probs, index)
        for rank in range(2):
            assert torch.equal(ranks[rank].status, single.status), (step, rank)
            rows = slice(4 * rank, 4 * rank + 4)
            assert torch.equal(decisions[rank].weights, whole.weights[rows])
    assert (single.status >= 0).sum() > 4  # both ranks' confident images were written


def test_freematch_ranks_hold_the_statistics_of_the_global_batch(two_ranks: FakeGroup) -> None:
    ranks = [FreeMatchThreshold(momentum=0.6).train() for _ in range(2)]
    single = FreeMatchThreshold(momentum=0.6).train()
    for step in range(4):
        probs = random_probs(8, seed=50 + step, scale=1.0 + step)
        probs[:4, 0] += 1.0  # the ranks' batches differ: a local statistic would show
        probs = probs / probs.sum(dim=1, keepdim=True)
        decisions = two_ranks.run(
            [lambda r=r, p=probs: ranks[r](p[4 * r : 4 * r + 4], None) for r in range(2)]
        )
        with pytest.MonkeyPatch.context() as patch:
            import torch.distributed as dist

            patch.setattr(dist, "is_initialized", lambda: False)
            whole = single(probs, None)
        for rank in range(2):
            for key, value in single.state_dict().items():
                assert torch.allclose(ranks[rank].state_dict()[key], value, atol=1e-6), (step, rank, key)
            assert torch.equal(decisions[rank].weights, whole.weights[4 * rank : 4 * rank + 4])


# -- records, checkpoints and the module --------------------------------------------------
@pytest.mark.parametrize(
    "rule",
    [
        FlexMatchThreshold(threshold=0.7, warmup=False, mapping="linear"),
        FlexMatchThreshold(alignment=DistributionAlignment(momentum=0.9)),
        FreeMatchThreshold(momentum=0.99, fairness_weight=0.01),
        FreeMatchThreshold(alignment=DistributionAlignment(momentum=0.5)),
    ],
    ids=["flex", "flex-aligned", "free", "free-aligned"],
)
def test_rule_record_and_build_rule_round_trip(rule: nn.Module) -> None:
    record = rule_record(rule)
    assert yaml.safe_load(yaml.safe_dump(record)) == record  # plain values only
    rebuilt = build_rule(record)
    assert type(rebuilt) is type(rule)
    assert rule_record(rebuilt) == record
    for name in record["init_args"]:
        value = getattr(rule, name)
        if isinstance(value, nn.Module):
            assert type(getattr(rebuilt, name)) is type(value)
            assert getattr(rebuilt, name).momentum == value.momentum
        else:
            assert getattr(rebuilt, name) == value


FACTS = {"num_classes": CLASSES, "channels": 1, "image_size": 8, "mean": (0.5,), "std": (0.25,)}


@pytest.mark.parametrize(
    "rule",
    [FlexMatchThreshold(threshold=0.7, mapping="linear"), FreeMatchThreshold(momentum=0.9)],
    ids=["flex", "free"],
)
def test_a_module_checkpoint_rebuilds_the_rule_with_its_state(rule: nn.Module, tmp_path) -> None:
    model = FixMatchModule(rule=rule, **FACTS)
    model.rule.allocate(CLASSES, 10)
    model.rule.train()
    for step in range(3):
        model.rule(random_probs(4, 60 + step, scale=5.0), torch.arange(4 * step, 4 * step + 4) % 10)
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams)}, path)
    checkpoint = torch.load(path, weights_only=True)
    restored = FixMatchModule(**checkpoint["hyper_parameters"])
    restored.load_state_dict(checkpoint["state_dict"])
    assert rule_record(restored.rule) == rule_record(model.rule)
    for key, value in model.rule.state_dict().items():
        assert torch.equal(restored.rule.state_dict()[key], value), key
    fresh = build_rule(rule_record(rule))
    fresh.allocate(CLASSES, 10)
    assert any(not torch.equal(v, fresh.state_dict()[k]) for k, v in model.rule.state_dict().items())


class Fn(nn.Module):
    def __init__(self, fn: Any) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


def test_fixmatch_module_masks_with_the_flexmatch_thresholds() -> None:
    """In ``FixMatchModule``, an image below tau but above its class's flexible threshold is taught;
    the loss is ``CE(labeled) + 1/U sum_u 1(max q_u >= T(argmax q_u)) CE(strong_u, argmax q_u)``."""
    torch.manual_seed(0)
    tau, num_samples, unlabeled = 0.95, 40, 16
    model = FixMatchModule(rule=FlexMatchThreshold(threshold=tau), **FACTS)
    model.rule.allocate(CLASSES, num_samples)
    # images 16..39 are not in the batch: 4 x class 0, 12 x class 1, 8 x class 2; 16 unused
    model.rule.status[16:] = torch.tensor([0] * 4 + [1] * 12 + [2] * 8)
    beta = [4 / 16, 12 / 16, 8 / 16]  # warm-up: / max(12, 16)
    thresholds = [tau * b / (2 - b) for b in beta]  # class 1: 0.57
    generator = torch.Generator().manual_seed(0)
    x, u = torch.rand(6, 1, 8, 8, generator=generator), torch.rand(unlabeled, 1, 8, 8, generator=generator)
    y = torch.arange(6) % CLASSES
    model.weak, model.strong = Fn(lambda images: images.flip(-1)), Fn(lambda images: 1.0 - images)
    norms = [m for m in model.backbone.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    with torch.no_grad():  # running statistics := the batch's, then eval: logits independent of the batch
        for layer in norms:
            layer.momentum = 1.0
        model.backbone.train()((torch.cat([x, u]) - 0.5) / 0.25)
        model.classifier.weight.mul_(4.0)  # confidences spread over (0.4, 0.9)
    model.train()
    for layer in norms:
        layer.eval()
    loss = model.training_step(train_batch(x, y, u), 0)

    def net(images: torch.Tensor) -> torch.Tensor:
        return model.classifier(model.backbone((images - 0.5) / 0.25))

    q = net(u.flip(-1)).detach().softmax(dim=1)
    confidence, labels = q.max(dim=1)
    mask = torch.tensor(
        [1.0 if c >= thresholds[k] else 0.0 for c, k in zip(confidence.tolist(), labels.tolist())]
    )
    assert (mask > (confidence >= tau).float()).any(), "no image below tau passes its class's threshold"
    assert (mask == 0).any(), "every image passes: the test cannot see a threshold that is too low"
    unlabeled_loss = (mask * F.cross_entropy(net(1.0 - u), labels, reduction="none")).sum() / unlabeled
    expected = F.cross_entropy(net(x.flip(-1)), y) + unlabeled_loss
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
