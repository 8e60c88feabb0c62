#!/usr/bin/env bash
# One short offline W&B run per self-supervised method added by the joint-embedding issue
# (VICReg, SimSiam, DINO with a ViT for its attention maps, SwAV, MAE), on the bundled digits,
# each config as it is. Then lists every image each run logged, with its size and the range of
# its pixel values (a near-black PNG would show max ~ 0): open them under
# $OUT/wandb/offline-run-*/files/media/images/.
#   bash benchmarks/wandb_visuals.sh [OUT]      # a few minutes on 2 CPU cores
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-/tmp/ssl-modules-wandb-visuals}
STEPS=${STEPS:-60}
export WANDB_MODE=offline OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
mkdir -p "$OUT"
run() {  # name config [overrides...]
    local name=$1 config=$2
    shift 2
    .venv/bin/ssl-modules fit --config configs/trainer/cpu.yaml --config configs/data/digits.yaml \
        --config "$config" --config configs/logger/wandb.yaml --trainer.logger.init_args.save_dir "$OUT" \
        --trainer.logger.init_args.name "$name" --trainer.max_steps "$STEPS" \
        --trainer.check_val_every_n_epoch 1 "$@" > "$OUT/$name.log" 2>&1
    echo "$name: done"
}
run vicreg configs/vicreg.yaml
run simsiam configs/simsiam.yaml
# longer: after 60 steps a ViT's attention is still nearly flat
run dino-vit_mini configs/dino.yaml --model.init_args.backbone vit_mini --trainer.max_steps "${DINO_STEPS:-300}"
run swav configs/swav.yaml
run mae configs/mae.yaml
.venv/bin/python - "$OUT" <<'PY'
import sys
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

for run in sorted(Path(sys.argv[1], "wandb").glob("offline-run-*")):
    configs = list((run / "files").glob("*/config.yaml"))  # the CLI's config of the run
    model = yaml.safe_load(configs[0].read_text())["model"] if configs else {}
    backbone = model.get("init_args", {}).get("backbone")
    print(f"== {run.name}: {model.get('class_path', '?')} ({backbone})")
    for png in sorted((run / "files" / "media" / "images").rglob("*.png")):
        pixels = np.asarray(Image.open(png))
        print(f"  {png.relative_to(run)}  {pixels.shape} {pixels.dtype} min {pixels.min()} max {pixels.max()} mean {pixels.mean():.1f}")
PY
