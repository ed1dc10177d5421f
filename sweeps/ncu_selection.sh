#!/usr/bin/env bash
# Choosing NCU's defaults on the validation split (never on test): noise 0.4, seed 0, the default data,
# model and budget. Every run starts from the same cached pre-trained checkpoint; two runs at a time with
# one torch thread each. Then: python -m ncu.report "$OUT" --metrics val/rsum,... (see docs/results.md).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-logs/sweeps/ncu_selection}
JOBS=${JOBS:-2}
COMMON="noise.rate=0.4 seed=0 logger=csv trainer.enable_progress_bar=false print_table=false"
OLD="method.negation.anchor=none method.negation.head=rotation"  # the first round's negated path
VARIANTS=(
  "method=clip"
  "method=filter"
  "method=ncu_official"
  # round 1: t~ = rotation head on the prompt path, not anchored (cos(t, t~) ends near -0.07, outside the band)
  "method=ncu $OLD"
  "method=ncu $OLD method.unlearn.flagged_captions=negative"
  "method=ncu $OLD method.unlearn.flagged_captions=negative method.unlearn.hn_capacity=flagged"
  "method=ncu $OLD method.unlearn.flagged_captions=drop method.unlearn.hn_capacity=flagged"
  # round 2: t~ anchored at the band's centre (the default)
  "method=ncu"
  "method=ncu method.unlearn.hn_capacity=flagged"
  "method=ncu method.unlearn.flagged_captions=negative method.unlearn.hn_capacity=flagged"
  "method=ncu method.gamma=0.3"
  "method=ncu method.unlearn.w_flagged=0.3"
  "method=ncu method.unlearn.detach_hn=true"
  "method=ncu_no_hn"
  "method=ncu method.unlearn.flagged_captions=drop"
  # round 3, diagnosis: flagged rows out of the loss (their weight 0), then flagged captions out as well
  # (what is left is filtering with OT soft targets on the clean rows instead of hard labels)
  "method=ncu method.unlearn.w_flagged=0"
  "method=ncu method.unlearn.w_flagged=0 method.unlearn.flagged_captions=drop"
)
${VARIANTS_ONLY:+exit 0}
"$PY" train.py method=pretrain_only $COMMON hydra.run.dir="$OUT/pretrain"  # fills the pre-training cache
i=0
for v in "${VARIANTS[@]}"; do  # run i writes $OUT/i; finished runs are skipped
  [ -f "$OUT/$i/metrics.json" ] || echo "OMP_NUM_THREADS=1 $PY train.py $v $COMMON hydra.run.dir=$OUT/$i"
  i=$((i + 1))
done | xargs -P "$JOBS" -I{} bash -c "{} > /dev/null 2>&1 || echo 'failed: {}'"
