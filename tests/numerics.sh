#!/usr/bin/env bash
# Before a release: the float equality and learning tests (marker `numerics`, listed in tests/conftest.py)
# under other CPU numerics than this machine's defaults: ATen's portable and AVX2 kernels instead of the
# widest the CPU has, MKL's conditional-numerical-reproducibility mode, and 1 and 2 OpenMP threads. Each
# variant must pass: a user's CPU runs some other combination of these, and a test that holds only on the
# machine it was tuned on fails there.
#
#   bash tests/numerics.sh                          # every variant, the whole marker (slow tests included)
#   bash tests/numerics.sh -m "numerics and not slow"   # the fast subset, a few minutes per variant
#   PYTHON=.venv/bin/python bash tests/numerics.sh   # another interpreter; further arguments go to pytest
set -u
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
VARIANTS=(
  "ATEN_CPU_CAPABILITY=default"
  "ATEN_CPU_CAPABILITY=avx2"
  "MKL_CBWR=COMPATIBLE"
  "OMP_NUM_THREADS=1"
  "OMP_NUM_THREADS=2"
)
failed=()
for variant in "${VARIANTS[@]}"; do
  echo "=== $variant"
  start=$SECONDS
  if env "$variant" "$PYTHON" -m pytest -q -p no:cacheprovider -m numerics "$@"; then
    echo "=== $variant: passed in $((SECONDS - start)) s"
  else
    echo "=== $variant: FAILED in $((SECONDS - start)) s"
    failed+=("$variant")
  fi
done
if ((${#failed[@]})); then
  echo "numerics: failed under ${failed[*]}"
  exit 1
fi
echo "numerics: every variant passed"
