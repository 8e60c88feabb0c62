#!/usr/bin/env bash
# Reproduces the README's results tables (CPU, offline; about 100 minutes on 2 cores).
# Each `ssl-modules bench` call measures its rows side by side in one run; the JSON records
# (with split indices and seeds) land in benchmarks/results/.
set -euo pipefail
cd "$(dirname "$0")/.."
BENCH=".venv/bin/ssl-modules bench"
COMMON=(--seeds 0 1 2 --max-steps 500)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

# The semi-supervised digits table: ONE bench command, every semi-supervised method of the library
# as a row, side by side with the reference rows: the supervised baseline on the same labels (first
# row: speeds are ratios to it) and the supervised ceiling with every label. --last-k 5: also the
# median val/acc of the last 5 validation runs (every 20 steps: steps 420-500).
$BENCH configs/supervised.yaml configs/recipes/supervised_all_labels.yaml \
    configs/self_training.yaml configs/entropy_minimization.yaml configs/mean_teacher.yaml configs/fixmatch.yaml \
    configs/recipes/distillation.yaml configs/recipes/noisy_student.yaml configs/recipes/simclr_fixmatch.yaml \
    --data configs/data/digits.yaml "${COMMON[@]}" --last-k 5 --val-every 20 --jobs 2 \
    --out benchmarks/results/digits_semi_supervised.json

# The semi-supervised digits table at very few labels (1 and 2 per class): supervised, FixMatch and
# the five methods that decide which pseudo-labels to trust (UDA, MixMatch, FlexMatch, FreeMatch,
# SoftMatch), one bench command per label budget.
bash benchmarks/semi_supervised_few_labels.sh

# The self-supervised digits table: ONE bench command, every self-supervised method as a row, with
# the random-init probes they must beat (linear_probe for the CNNs, linear_probe_vit_mini for MAE);
# then every self-supervised method's training step against its limit.
$BENCH configs/linear_probe.yaml configs/rotation.yaml configs/jigsaw.yaml configs/denoising_autoencoder.yaml \
    configs/simclr.yaml configs/moco.yaml configs/byol.yaml configs/barlow_twins.yaml \
    configs/vicreg.yaml configs/simsiam.yaml configs/dino.yaml configs/swav.yaml \
    configs/linear_probe_vit_mini.yaml configs/mae.yaml \
    --data configs/data/digits.yaml "${COMMON[@]}" --last-k 5 --val-every 20 --jobs 2 \
    --out benchmarks/results/digits_self_supervised.json
.venv/bin/python benchmarks/self_supervised_throughput.py --out benchmarks/results

# The supervised baseline against a plain PyTorch loop, per label budget and image size
.venv/bin/python benchmarks/plain_loop.py --jobs 2

# colorization needs colour: generated coloured shapes as an image folder, 5 labels per class
COLOR_ROOT=${COLOR_ROOT:-/tmp/ssl-modules-color-shapes}
[ -d "$COLOR_ROOT/train" ] || .venv/bin/python benchmarks/make_color_folder.py "$COLOR_ROOT"
$BENCH configs/linear_probe.yaml configs/colorization.yaml configs/supervised.yaml \
    --data configs/data/image_folder.yaml --set data.root="$COLOR_ROOT" --set data.image_size=32 \
    --set data.labels_per_class=5 --set data.num_workers=0 "${COMMON[@]}" --out benchmarks/results/color_shapes.json
