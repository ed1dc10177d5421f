#!/usr/bin/env bash
# Choosing NCU's defaults on the validation split (never on test): noise 0.4, seed 0, the default data,
# model and budget. Every run starts from the same cached pre-trained checkpoint; two runs at a time with
# one torch thread each. Then: python -m ncu.report "$OUT" --metrics val/rsum,... (see the README).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-logs/sweeps/ncu_selection}
JOBS=${JOBS:-2}
COMMON="noise.rate=0.4 seed=0 logger=csv trainer.enable_progress_bar=false print_table=false"
VARIANTS=(
  "method=clip"
  "method=filter"
  "method=ncu_official"
  "method=ncu"
  "method=ncu method.unlearn.flagged_captions=negative"
  "method=ncu method.unlearn.flagged_captions=negative method.unlearn.hn_capacity=flagged"
  "method=ncu method.unlearn.flagged_captions=drop method.unlearn.hn_capacity=flagged"
  "method=ncu method.unlearn.flagged_captions=negative method.unlearn.hn_capacity=flagged method.unlearn.detach_hn=true"
  "method=ncu method.unlearn.flagged_captions=negative method.unlearn.hn_capacity=flagged method.unlearn.w_flagged=0.3"
  "method=ncu method.unlearn.flagged_captions=negative method.unlearn.hn_capacity=flagged method.gamma=0.3"
  "method=ncu_no_hn method.unlearn.flagged_captions=negative"
  "method=ncu_stage2_only method.unlearn.flagged_captions=negative method.unlearn.hn_capacity=flagged"
)
${VARIANTS_ONLY:+exit 0}
"$PY" train.py method=pretrain_only $COMMON hydra.run.dir="$OUT/pretrain"  # fills the pre-training cache
i=0
for v in "${VARIANTS[@]}"; do
  echo "OMP_NUM_THREADS=1 $PY train.py $v $COMMON hydra.run.dir=$OUT/$i"
  i=$((i + 1))
done | xargs -P "$JOBS" -I{} bash -c "{} > /dev/null 2>&1 || echo 'failed: {}'"
