#!/usr/bin/env bash
# Selection on the VALIDATION split for BYOL and Barlow Twins (issue 14, quality bar: both probed
# barely above the supervised baseline on 28 px digits with 10 labels per class after 1,500 steps).
# Protocol, written before any of these runs:
# - Setting: the bundled digits (configs/data/digits.yaml) at image_size 28, labels_per_class 10,
#   1,500 steps, seeds 0 1 2 (each seed also draws the labeled split), OMP_NUM_THREADS=1, --jobs 2.
# - Metric: each pretraining is followed by configs/linear_probe.yaml on its frozen backbone (same
#   steps); the probe is validated every 50 steps and a run's number is the median of its last 5
#   val/acc (steps 1300-1500, `val_acc_last_k_median` of the `+linear_probe` rows); a candidate's
#   number is the median over the 3 seeds. The probe's own lr (0.1) does not depend on the
#   candidate, unlike the methods' online probe, which trains at the method's lr. test_acc is
#   printed by bench but not read for the decision.
# - Rule (as benchmarks/select_defaults.sh): the highest median val wins; within one validation
#   image (1/145 = 0.007) of the best, the paper's value is kept: BYOL's asymmetric views,
#   Barlow Twins' bias lr ratio 0.0048 / 0.2 = 0.024 and, for its LARS lr, the current 0.2
#   (the paper's value before batch scaling).
# - Candidates. Round 1: Barlow Twins with biases/BatchNorm at the weights' lr (the code before
#   bias_lr_ratio) against the paper's ratio, both at lr 0.2; BYOL with symmetric views (the
#   current behaviour) against the paper's asymmetric ones. Round 2, only if the ~40-minute
#   budget of the shared 2-core machine allows it: Barlow Twins' LARS lr 0.05 (the paper's
#   0.2 x 64 / 256) and 1.0 (SimCLR's and BYOL's short-run value) at the ratio round 1 picks.
#   Comparison rows (MoCo, rotation, random-init probe) only if the budget allows.
# Usage: benchmarks/selection/byol_barlow.sh [barlow_twins|byol|barlow_twins_lr]
#   (round 1 is barlow_twins then byol, each its own bench command and JSON; round 2 is barlow_twins_lr)
set -euo pipefail
cd "$(dirname "$0")/../.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
COMMON=(--data configs/data/digits.yaml --set data.image_size=28 --set data.labels_per_class=10
    --seeds 0 1 2 --max-steps 1500 --last-k 5 --val-every 50 --downstream configs/linear_probe.yaml
    --jobs "${JOBS:-2}")
S=benchmarks/selection
case "${1:-barlow_twins}" in
barlow_twins)
    .venv/bin/ssl-modules bench $S/barlow_twins_bias_lr_1.yaml $S/barlow_twins_bias_lr_paper.yaml \
        "${COMMON[@]}" --out benchmarks/results/selection_byol_barlow_barlow_twins.json ;;
byol)
    .venv/bin/ssl-modules bench $S/byol_symmetric.yaml $S/byol_asymmetric.yaml \
        "${COMMON[@]}" --out benchmarks/results/selection_byol_barlow_byol.json ;;
barlow_twins_lr)
    .venv/bin/ssl-modules bench $S/barlow_twins_lr_0.05.yaml $S/barlow_twins_lr_1.0.yaml \
        "${COMMON[@]}" --out benchmarks/results/selection_byol_barlow_barlow_twins_lr.json ;;
*)
    echo "unknown round ${1}; use barlow_twins, byol or barlow_twins_lr" >&2
    exit 2 ;;
esac
