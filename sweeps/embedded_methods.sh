#!/usr/bin/env bash
# The method comparison on the embedded data: the noisy pre-trained model, clip, filter, grad_ascent and
# ncu at noise rate 0.4, plus the clean (rate 0) pre-trained reference, 3 seeds each.
# Jobs run in order (method varies slowest), so the pretrain_only jobs fill the pre-training cache
# (data/pretrained) and every method of the same seed starts from that same checkpoint.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-logs/sweeps/embedded_methods}
COMMON=(logger=csv trainer.enable_progress_bar=false print_table=false)
"$PY" train.py -m method=pretrain_only noise.rate=0.0 seed=0,1,2 hydra.sweep.dir="$OUT/clean" "${COMMON[@]}"
"$PY" train.py -m method=pretrain_only,clip,filter,grad_ascent,ncu noise.rate=0.4 seed=0,1,2 \
    hydra.sweep.dir="$OUT/noisy" "${COMMON[@]}"
"$PY" -m ncu.report "$OUT" --metrics test/rsum,test/zeroshot_top1,test/i2t_R@1,test/t2i_R@1,val/rsum,train/nc_auroc
