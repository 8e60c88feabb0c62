#!/usr/bin/env bash
# Reproduces the README's results tables (CPU, offline; about an hour on 2 cores).
# Each `ssl-modules bench` call measures its rows side by side in one run; the JSON records
# (with split indices and seeds) land in benchmarks/results/.
set -euo pipefail
cd "$(dirname "$0")/.."
BENCH=".venv/bin/ssl-modules bench"
COMMON=(--seeds 0 1 2 --max-steps 500)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

# supervised baseline + semi-supervised family, digits, 5 labels per class
$BENCH configs/supervised.yaml configs/self_training.yaml configs/mean_teacher.yaml configs/fixmatch.yaml \
    configs/recipes/distillation.yaml configs/recipes/noisy_student.yaml configs/recipes/simclr_fixmatch.yaml \
    --data configs/data/digits.yaml "${COMMON[@]}" --out benchmarks/results/digits_semi_supervised.json

# random-init probe + self-supervised family, digits, 5 labels per class
$BENCH configs/linear_probe.yaml configs/rotation.yaml configs/jigsaw.yaml configs/denoising_autoencoder.yaml \
    configs/simclr.yaml configs/moco.yaml configs/byol.yaml configs/barlow_twins.yaml \
    --data configs/data/digits.yaml "${COMMON[@]}" --out benchmarks/results/digits_self_supervised.json

# the ceiling: supervised with every training label
$BENCH configs/supervised.yaml --data configs/data/digits.yaml --set data.labels_per_class=null \
    "${COMMON[@]}" --out benchmarks/results/digits_all_labels.json

# colorization needs colour: generated coloured shapes as an image folder, 5 labels per class
COLOR_ROOT=${COLOR_ROOT:-/tmp/ssl-modules-color-shapes}
[ -d "$COLOR_ROOT/train" ] || .venv/bin/python benchmarks/make_color_folder.py "$COLOR_ROOT"
$BENCH configs/linear_probe.yaml configs/colorization.yaml configs/supervised.yaml \
    --data configs/data/image_folder.yaml --set data.root="$COLOR_ROOT" --set data.image_size=32 \
    --set data.labels_per_class=5 --set data.num_workers=0 "${COMMON[@]}" --out benchmarks/results/color_shapes.json
