#!/usr/bin/env bash
# The semi-supervised digits table at very few labels (1 and 2 per class): the supervised baseline,
# FixMatch and the five methods that decide which pseudo-labels to trust, side by side, one bench
# command per label budget (3 seeds, 500 steps each, the configs as they are; val/acc every 20 steps,
# median of the last 5). About 70 minutes on 2 cores. Records: benchmarks/results/digits_few_labels_<n>.json
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
for LABELS in ${LABELS:-1 2}; do
  .venv/bin/ssl-modules bench configs/supervised.yaml configs/fixmatch.yaml configs/uda.yaml configs/mixmatch.yaml \
      configs/flexmatch.yaml configs/freematch.yaml configs/softmatch.yaml \
      --data configs/data/digits.yaml --set data.labels_per_class="$LABELS" \
      --seeds 0 1 2 --max-steps 500 --last-k 5 --val-every 20 --jobs 2 \
      --out "benchmarks/results/digits_few_labels_${LABELS}.json"
done
