"""DINO and SwAV losses (and Sinkhorn-Knopp) against the papers' formulas written out plainly.

References these reproduce (not dependencies): lightly's ``lightly.loss.DINOLoss`` (forward of
teacher_out / student_out lists, the diagonal of the (teacher view, student view) table zeroed),
``lightly.loss.SwaVLoss`` and ``lightly.loss.swav_loss.sinkhorn``, and the authors' code
(facebookresearch/dino ``DINOLoss``, facebookresearch/swav ``distributed_sinkhorn``).
"""

from __future__ import annotations

import math
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ssl_modules.losses.self_distillation import DINOLoss, SwAVLoss, sinkhorn


# -- plain references -------------------------------------------------------------------
def softmax_row(values: list[float], temperature: float) -> list[float]:
    top = max(values)
    exps = [math.exp((v - top) / temperature) for v in values]
    total = sum(exps)
    return [e / total for e in exps]


def dino_loop(teacher, student, center, teacher_temperature, student_temperature) -> float:
    """DINO (paper Algorithm 1, multi-crop): mean over pairs (teacher crop i, student crop v != i)
    of the batch mean of -sum_k P_t[k] log P_s[k], P_t = softmax((t - c)/tau_t), P_s = softmax(s/tau_s)."""
    total, pairs = 0.0, 0
    for i, t_crop in enumerate(teacher):
        for v, s_crop in enumerate(student):
            if v == i:
                continue
            batch = 0.0
            for t_row, s_row in zip(t_crop.tolist(), s_crop.tolist()):
                p_t = softmax_row([a - c for a, c in zip(t_row, center.tolist())], teacher_temperature)
                p_s = softmax_row(s_row, student_temperature)
                batch += -sum(pt * math.log(ps) for pt, ps in zip(p_t, p_s))
            total += batch / len(t_crop)
            pairs += 1
    return total / pairs


def sinkhorn_loop(scores: torch.Tensor, epsilon: float, iterations: int) -> torch.Tensor:
    """SwAV Algorithm 1 / distributed_sinkhorn in one process, with explicit loops over a list of lists."""
    batch_size, num_prototypes = scores.shape
    plan = [
        [math.exp(scores[b, k].item() / epsilon) for b in range(batch_size)] for k in range(num_prototypes)
    ]
    total = sum(sum(row) for row in plan)
    plan = [[q / total for q in row] for row in plan]
    for _ in range(iterations):
        for k in range(num_prototypes):
            row_sum = sum(plan[k])
            plan[k] = [q / row_sum / num_prototypes for q in plan[k]]
        for b in range(batch_size):
            col_sum = sum(plan[k][b] for k in range(num_prototypes))
            for k in range(num_prototypes):
                plan[k][b] = plan[k][b] / col_sum / batch_size
    codes = [[plan[k][b] * batch_size for k in range(num_prototypes)] for b in range(batch_size)]
    return torch.tensor(codes, dtype=torch.float64)


def swav_loop(all_scores, codes, temperature) -> float:
    """Swapped prediction: mean over assigned crops i of the mean over crops v != i of
    -mean_batch sum_k q_i[k] log softmax(s_v / T)[k]."""
    total = 0.0
    for i, q_crop in enumerate(codes):
        sub = 0.0
        for v, s_crop in enumerate(all_scores):
            if v == i:
                continue
            batch = 0.0
            for q_row, s_row in zip(q_crop.tolist(), s_crop.tolist()):
                p = softmax_row(s_row, temperature)
                batch += -sum(q * math.log(pk) for q, pk in zip(q_row, p))
            sub += batch / len(q_crop)
        total += sub / (len(all_scores) - 1)
    return total / len(codes)


def unit_scores(batch_size: int, num_prototypes: int, dim: int = 6, seed: int = 0) -> torch.Tensor:
    """Cosine scores of L2-normalised embeddings against L2-normalised prototypes, as in SwAV."""
    generator = torch.Generator().manual_seed(seed)
    z = torch.nn.functional.normalize(
        torch.randn(batch_size, dim, generator=generator, dtype=torch.float64), dim=1
    )
    c = torch.nn.functional.normalize(
        torch.randn(num_prototypes, dim, generator=generator, dtype=torch.float64), dim=1
    )
    return z @ c.T


# -- DINO ---------------------------------------------------------------------------------
@pytest.mark.parametrize("num_local", [0, 3])
def test_dino_matches_loop_reference_with_a_center(num_local):
    torch.manual_seed(0)
    batch_size, out_dim = 4, 7
    teacher = [torch.randn(batch_size, out_dim, dtype=torch.float64) for _ in range(2)]
    student = [torch.randn(batch_size, out_dim, dtype=torch.float64) for _ in range(2 + num_local)]
    loss_fn = DINOLoss(out_dim, student_temperature=0.1, teacher_temperature=0.04)
    loss_fn.center.copy_(torch.randn(out_dim) * 0.5)  # a non-zero center must be subtracted
    expected = dino_loop(teacher, student, loss_fn.center.clone(), 0.04, 0.1)
    assert loss_fn(teacher, student).item() == pytest.approx(expected, rel=1e-9)


def test_dino_skips_same_view_pairs():
    # one teacher crop: the student's output of that same crop never enters the loss
    torch.manual_seed(1)
    teacher = [torch.randn(5, 6)]
    student = [torch.randn(5, 6, requires_grad=True) for _ in range(3)]
    loss_fn = DINOLoss(6).eval()
    loss = loss_fn(teacher, student)
    changed = [torch.randn(5, 6) * 10, student[1], student[2]]
    assert loss_fn(teacher, changed).item() == pytest.approx(loss.item(), rel=1e-6)
    loss.backward()
    assert student[0].grad is None or torch.all(student[0].grad == 0)
    assert student[1].grad.abs().sum() > 0


def test_dino_student_gradient_closed_form_and_teacher_without_gradient():
    # d/ds of -sum_k P_t log softmax(s/tau_s) = (softmax(s/tau_s) - P_t) / tau_s, per pair, batch mean
    torch.manual_seed(2)
    batch_size, out_dim, tau_s, tau_t = 3, 5, 0.1, 0.04
    teacher = [torch.randn(batch_size, out_dim, dtype=torch.float64) for _ in range(2)]
    student = [torch.randn(batch_size, out_dim, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    DINOLoss(out_dim, student_temperature=tau_s, teacher_temperature=tau_t)(teacher, student).backward()
    pairs = 2 * 3 - 2
    for v, s in enumerate(student):
        expected = torch.zeros_like(s)
        for i, t in enumerate(teacher):
            if i != v:
                expected += (torch.softmax(s.detach() / tau_s, 1) - torch.softmax(t / tau_t, 1)) / tau_s
        torch.testing.assert_close(s.grad, expected / batch_size / pairs)
    with pytest.raises(ValueError, match="no_grad"):
        DINOLoss(out_dim)([t.requires_grad_() for t in teacher], student)


def test_dino_center_is_an_ema_of_the_raw_teacher_outputs_over_all_global_crops():
    torch.manual_seed(3)
    loss_fn = DINOLoss(4, center_momentum=0.9)
    old_center = torch.randn(4)
    loss_fn.center.copy_(old_center)
    teacher = [torch.randn(6, 4) for _ in range(2)]
    student = [torch.randn(6, 4) for _ in range(2)]
    loss_fn(teacher, student)
    batch_mean = [sum(t[b, k].item() for t in teacher for b in range(6)) / 12 for k in range(4)]
    expected = [0.9 * c + 0.1 * m for c, m in zip(old_center.tolist(), batch_mean)]
    torch.testing.assert_close(loss_fn.center, torch.tensor(expected))
    # the loss of that step used the center from before the update
    loss_fn.center.copy_(old_center)
    assert loss_fn(teacher, student).item() == pytest.approx(
        dino_loop(teacher, student, old_center, 0.04, 0.1), rel=1e-5
    )
    # evaluation does not move the center
    center = loss_fn.center.clone()
    loss_fn.eval()(teacher, student)
    torch.testing.assert_close(loss_fn.center, center)


def test_dino_centering_removes_a_dominant_teacher_dimension():
    # a teacher collapsed onto dimension 0 (a large constant on it for every image): centering
    # subtracts that constant, so the sharpened target spreads over the images' own features
    # again. Without centering (or without updating the center) the target stays one-hot on 0.
    torch.manual_seed(4)
    loss_fn = DINOLoss(8, center_momentum=0.9)
    teacher_features = torch.randn(16, 8) * 0.1
    teacher_features[:, 0] += 5.0
    student = [torch.randn(16, 8) for _ in range(2)]
    first_target = torch.softmax((teacher_features - loss_fn.center) / 0.04, dim=1)
    assert first_target[:, 0].mean() > 0.99  # collapsed before any centering
    for _ in range(60):
        loss_fn([teacher_features, teacher_features], student)
    target = torch.softmax((teacher_features - loss_fn.center) / 0.04, dim=1)
    assert target[:, 0].mean() < 0.3
    assert target.argmax(dim=1).unique().numel() >= 4  # different images, different targets


def test_dino_teacher_temperature_schedule_is_a_function_of_the_step():
    loss_fn = DINOLoss(
        3, warmup_teacher_temperature=0.04, teacher_temperature=0.07, warmup_teacher_temperature_steps=10
    )
    assert loss_fn.teacher_temperature_at(0) == pytest.approx(0.04)
    assert loss_fn.teacher_temperature_at(5) == pytest.approx(0.055)
    assert loss_fn.teacher_temperature_at(10) == pytest.approx(0.07)
    assert loss_fn.teacher_temperature_at(1000) == pytest.approx(0.07)
    # the loss at a step uses that step's temperature, whatever came before
    torch.manual_seed(5)
    teacher = [torch.randn(3, 3, dtype=torch.float64) for _ in range(2)]
    student = [torch.randn(3, 3, dtype=torch.float64) for _ in range(2)]
    loss_fn.eval()
    expected = dino_loop(teacher, student, torch.zeros(3), 0.055, 0.1)
    assert loss_fn(teacher, student, step=5).item() == pytest.approx(expected, rel=1e-9)
    # paper-code default: 0.04 throughout
    assert DINOLoss(3).teacher_temperature_at(0) == DINOLoss(3).teacher_temperature_at(10**6) == 0.04


def test_dino_checks_arguments():
    with pytest.raises(ValueError, match="student_temperature"):
        DINOLoss(4, student_temperature=0.0)
    with pytest.raises(ValueError, match="center_momentum"):
        DINOLoss(4, center_momentum=1.0)
    with pytest.raises(ValueError, match="warmup_teacher_temperature_steps"):
        DINOLoss(4, warmup_teacher_temperature_steps=-1)
    with pytest.raises(ValueError, match="out_dim"):
        DINOLoss(4)([torch.randn(2, 5)], [torch.randn(2, 5)] * 2)
    with pytest.raises(ValueError, match="at least 2 crops"):
        DINOLoss(4)([torch.randn(2, 4)], [torch.randn(2, 4)])
    with pytest.raises(ValueError, match="list"):
        DINOLoss(4)(torch.randn(2, 4), [torch.randn(2, 4)] * 2)


# -- Sinkhorn-Knopp -----------------------------------------------------------------------
@pytest.mark.parametrize("iterations", [1, 3])
def test_sinkhorn_matches_loop_reference(iterations):
    scores = unit_scores(6, 4)
    expected = sinkhorn_loop(scores, epsilon=0.05, iterations=iterations)
    torch.testing.assert_close(sinkhorn(scores, epsilon=0.05, iterations=iterations), expected)


def test_sinkhorn_marginals():
    batch_size, num_prototypes = 24, 6
    scores = unit_scores(batch_size, num_prototypes, seed=1)
    uniform = torch.full((batch_size,), 1 / batch_size, dtype=torch.float64)
    # the plan Q = codes / B: columns (samples) sum to 1/B exactly after the last iteration, rows
    # (prototypes) to 1/K approximately, closer with every iteration than the softmax of the scores
    softmax_mass = torch.softmax(scores / 0.05, dim=1).sum(dim=0) / batch_size
    deviations = [(softmax_mass * num_prototypes - 1).abs().max().item()]
    for iterations in (1, 3, 10, 200):
        plan = sinkhorn(scores, epsilon=0.05, iterations=iterations) / batch_size  # (B, K)
        torch.testing.assert_close(plan.sum(dim=1), uniform)
        deviations.append((plan.sum(dim=0) * num_prototypes - 1).abs().max().item())
    assert deviations == sorted(deviations, reverse=True)
    assert deviations[-1] < 1e-6  # converged: rows 1/K


def test_sinkhorn_gives_a_prototype_that_wins_everywhere_only_its_share():
    # adding a constant to one prototype's scores (it wins on every sample: the collapse SwAV
    # prevents) scales a row of Q, which the row normalisation removes: the codes do not change
    scores = unit_scores(24, 6, seed=1)
    biased = scores.clone()
    biased[:, 0] += 2.0
    assert torch.softmax(biased / 0.05, dim=1).argmax(dim=1).eq(0).float().mean() > 0.9
    torch.testing.assert_close(sinkhorn(biased), sinkhorn(scores))


def test_sinkhorn_is_shift_invariant_and_finite_on_large_scores():
    scores = unit_scores(8, 5, seed=2)
    torch.testing.assert_close(sinkhorn(scores + 3.0), sinkhorn(scores))
    # float32, scores offset by 100: exp(100 / 0.05) overflows without the shift by the max
    offset = sinkhorn((scores + 100).float())
    assert torch.isfinite(offset).all()
    torch.testing.assert_close(offset, sinkhorn(scores.float()), atol=1e-4, rtol=1e-3)
    with pytest.raises(ValueError, match="epsilon"):
        sinkhorn(scores, epsilon=0.0)


# -- SwAV ---------------------------------------------------------------------------------
@pytest.mark.parametrize("num_local", [0, 2])
def test_swav_matches_loop_reference(num_local):
    global_scores = [unit_scores(6, 4, seed=s) for s in (10, 11)]
    local_scores = [unit_scores(6, 4, seed=20 + s) for s in range(num_local)]
    codes = [sinkhorn_loop(s, 0.05, 3) for s in global_scores]  # codes of the global crops only
    expected = swav_loop(global_scores + local_scores, codes, temperature=0.1)
    assert SwAVLoss(temperature=0.1)(global_scores, local_scores).item() == pytest.approx(expected, rel=1e-9)


def test_swav_codes_carry_no_gradient():
    # the gradient w.r.t. the scores is that of the swapped prediction with the codes as constants
    global_scores = [unit_scores(5, 4, seed=s).requires_grad_() for s in (30, 31)]
    local_scores = [unit_scores(5, 4, seed=32).requires_grad_()]
    loss_fn = SwAVLoss()
    codes = loss_fn.codes(global_scores)
    assert not any(q.requires_grad for q in codes)
    loss_fn(global_scores, local_scores).backward()
    constants = [sinkhorn_loop(s.detach(), 0.05, 3) for s in global_scores]
    all_scores = global_scores + local_scores
    for v, s in enumerate(all_scores):  # d/ds_v of -sum q log softmax(s/T) = (softmax(s/T) - q) / T
        expected = torch.zeros_like(s)
        for i, q in enumerate(constants):
            if i != v:
                expected += (torch.softmax(s.detach() / 0.1, 1) - q) / 0.1 / len(s) / (len(all_scores) - 1)
        torch.testing.assert_close(s.grad, expected / len(constants))


def test_swav_queue_joins_the_sinkhorn_and_only_the_batch_codes_are_kept():
    batch = [unit_scores(4, 5, seed=s) for s in (40, 41)]
    queue = [unit_scores(12, 5, seed=s) for s in (42, 43)]
    loss_fn = SwAVLoss()
    with_queue = loss_fn.codes(batch, queue)
    for codes, b, q in zip(with_queue, batch, queue):
        assert codes.shape == (4, 5)
        torch.testing.assert_close(codes, sinkhorn_loop(torch.cat([q, b]), 0.05, 3)[-4:])
    without = loss_fn.codes(batch)
    assert (with_queue[0] - without[0]).abs().max() > 1e-3  # the queue changes the equipartition
    expected = swav_loop(batch, with_queue, 0.1)
    assert loss_fn(batch, queue_scores=queue).item() == pytest.approx(expected, rel=1e-9)
    assert loss_fn.codes(batch, [None, queue[1]])[0].equal(without[0])  # a crop without a queue
    with pytest.raises(ValueError, match="one entry"):
        loss_fn.codes(batch, queue[:1])


def test_swav_checks_arguments():
    with pytest.raises(ValueError, match="temperature"):
        SwAVLoss(temperature=0.0)
    with pytest.raises(ValueError, match="sinkhorn_iterations"):
        SwAVLoss(sinkhorn_iterations=0)
    with pytest.raises(ValueError, match="at least 2 crops"):
        SwAVLoss()([torch.randn(3, 4)])
    with pytest.raises(ValueError, match="same shape"):
        SwAVLoss()([torch.randn(3, 4)], [torch.randn(3, 5)])


# -- the global batch under DDP (2 spawned processes, gloo) -----------------------------------
WORLD_SIZE = 2


def global_inputs():
    generator = torch.Generator().manual_seed(7)
    teacher = [torch.randn(8, 5, generator=generator, dtype=torch.float64) * 3 for _ in range(2)]
    student = [torch.randn(8, 5, generator=generator, dtype=torch.float64) for _ in range(3)]
    scores = [torch.randn(8, 4, generator=generator, dtype=torch.float64) for _ in range(2)]
    return teacher, student, scores


def split_run(rank: int, world_size: int, gather_distributed: bool) -> dict[str, torch.Tensor]:
    teacher, student, scores = global_inputs()
    size = 8 // world_size
    part = slice(rank * size, (rank + 1) * size)
    dino = DINOLoss(5, gather_distributed=gather_distributed)
    dino_loss = dino([t[part] for t in teacher], [s[part] for s in student])
    swav = SwAVLoss(gather_distributed=gather_distributed)
    codes = torch.cat(swav.codes([s[part] for s in scores]))
    return {"center": dino.center.clone(), "dino_loss": dino_loss.detach(), "codes": codes}


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD_SIZE)
    try:
        for gather in (True, False):
            torch.save(split_run(rank, WORLD_SIZE, gather), os.path.join(out_dir, f"{gather}-{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_center_and_codes_use_the_global_batch_under_ddp():
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_worker, args=(os.path.join(out_dir, "init"), out_dir), nprocs=WORLD_SIZE, join=True)
        runs = {
            (gather, rank): torch.load(os.path.join(out_dir, f"{gather}-{rank}.pt"))
            for gather in (True, False)
            for rank in range(WORLD_SIZE)
        }
    whole = split_run(0, 1, True)
    size = 8 // WORLD_SIZE
    for rank in range(WORLD_SIZE):
        torch.testing.assert_close(runs[(True, rank)]["center"], whole["center"])  # every rank, one center
        # the codes of each rank's rows are the whole batch's (per global crop: rows rank*size...)
        whole_codes = whole["codes"].view(2, 8, 4)[:, rank * size : (rank + 1) * size].reshape(-1, 4)
        torch.testing.assert_close(runs[(True, rank)]["codes"], whole_codes)
    # the mean of the per-rank losses (DDP's gradient average) is the whole batch's loss
    mean_loss = sum(runs[(True, rank)]["dino_loss"] for rank in range(WORLD_SIZE)) / WORLD_SIZE
    torch.testing.assert_close(mean_loss, whole["dino_loss"])
    # control: per-rank statistics differ from the global ones, so the comparison can fail
    assert (runs[(False, 0)]["center"] - whole["center"]).abs().max() > 1e-3
    whole_rank0 = whole["codes"].view(2, 8, 4)[:, :size].reshape(-1, 4)
    assert (runs[(False, 0)]["codes"] - whole_rank0).abs().max() > 1e-3
