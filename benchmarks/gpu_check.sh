#!/usr/bin/env bash
# The GPU check in one command, for a bare GPU machine without network (see benchmarks/gpu_check.py
# for what it measures). Its Python must already have torch, torchvision, lightning, torchmetrics
# (and timm); what else the library imports (kornia, jsonargparse[signatures], wandb) is installed
# offline from a folder of wheels made beforehand on a machine with network:
#
#   bash benchmarks/prepare_gpu_wheels.sh              # -> build/gpu_wheels (git-ignored)
#   bash benchmarks/gpu_check.sh --out "$OUT"          # on the GPU machine, from the checkout
#
# Options (the rest goes to gpu_check.py, e.g. --tiny, --modules, --sections):
#   --out DIR       where gpu_check.json / gpu_check.md go (default: $OUT, else gpu_check_out)
#   --wheels DIR    the wheel folder (default: $GPU_WHEELS, else build/gpu_wheels)
#   --skip-pip      do not install anything (also: SKIP_PIP=1)
# Runs from the checkout with PYTHONPATH (no editable install) and stops itself after
# $GPU_CHECK_TIMEOUT seconds (default 570), inside a 10-minute command; every section is written
# as it finishes, so a cut-short run still reports what it did.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
OUT_DIR="${OUT:-gpu_check_out}"
WHEELS="${GPU_WHEELS:-build/gpu_wheels}"
SKIP="${SKIP_PIP:-0}"
PASS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --out) OUT_DIR="$2"; shift 2 ;;
    --wheels) WHEELS="$2"; shift 2 ;;
    --skip-pip) SKIP=1; shift ;;
    *) PASS+=("$1"); shift ;;
  esac
done

if [ "$SKIP" != 1 ]; then
  # only what is missing: an installed package is never replaced
  MISSING=$("$PY" - <<'PYEOF'
import importlib.util
wanted = {"kornia": "kornia", "jsonargparse": "jsonargparse[signatures]", "docstring_parser": "docstring-parser",
          "typeshed_client": "typeshed-client", "wandb": "wandb"}
print(" ".join(spec for module, spec in wanted.items() if importlib.util.find_spec(module) is None))
PYEOF
)
  if [ -n "$MISSING" ]; then
    echo "gpu_check: installing from $WHEELS: $MISSING"
    # shellcheck disable=SC2086
    "$PY" -m pip install --quiet --no-index --find-links "$WHEELS" $MISSING \
      || echo "gpu_check: WARNING: pip install from $WHEELS failed; going on with what is installed"
  fi
fi

export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export WANDB_MODE="${WANDB_MODE:-offline}"
timeout --signal=INT --kill-after=20 "${GPU_CHECK_TIMEOUT:-570}" \
  "$PY" benchmarks/gpu_check.py --out "$OUT_DIR" "${PASS[@]}"
STATUS=$?
echo "gpu_check: exit $STATUS; report in $OUT_DIR/gpu_check.md"
exit $STATUS
