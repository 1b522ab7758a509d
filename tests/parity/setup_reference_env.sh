#!/usr/bin/env bash
# Build the isolated reference environment for the opt-in parity tests (RLFH_PARITY=1).
#
# Versions: the FaceScore reference's requirements.txt (OPPO-Mente-Lab/FaceScore: image-reward==1.5, clip;
# batch-face is left out, see below) with the transformers / timm / fairscale that image-reward 1.5's
# BLIP code imports without error (transformers 4.36, timm 0.6, fairscale 0.4). The venv lives outside
# the tracked files (default: <repo>/.ref-venv, gitignored) so it never mixes with the project venv.
# torch 2.14.1 is the CUDA build from the registry: it runs on CPU and is the one torchvision
# 0.29.1 pairs with. fairscale needs --no-build-isolation (its setup.py imports torch);
# openai-clip needs setuptools < 81 for pkg_resources; image-reward goes in with --no-deps so pip
# does not re-resolve the pins above. opencv is needed by the FaceScore reference (cv2.imread).
#
# The FaceScore reference (OPPO-Mente-Lab/FaceScore, not on PyPI) is placed, unmodified, in
# VENV/src/FaceScore: copied from $RLFH_FACESCORE_SRC (a checkout) when set, else git-cloned.
# Its detector package batch_face is NOT installed: the parity test replaces it with given boxes.
#
# Usage: tests/parity/setup_reference_env.sh [VENV_DIR]
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VENV="${1:-${RLFH_REF_VENV:-$REPO/.ref-venv}}"
PY="${PYTHON:-python3}"

if [[ ! -x "$VENV/bin/python" ]]; then
    "$PY" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip install --disable-pip-version-check)

"${PIP[@]}" --upgrade pip "setuptools<81" wheel
"${PIP[@]}" torch==2.14.1 torchvision==0.29.1
"${PIP[@]}" transformers==4.36.2 timm==0.6.13 diffusers==0.30.3 accelerate datasets \
    openai-clip "setuptools<81" numpy pillow
"${PIP[@]}" --no-build-isolation fairscale==0.4.13
"${PIP[@]}" --no-deps image-reward==1.5
"${PIP[@]}" opencv-python-headless pyyaml

SRC="$VENV/src/FaceScore"
if [[ ! -f "$SRC/FaceScore/FaceScore.py" ]]; then
    mkdir -p "$VENV/src"
    if [[ -n "${RLFH_FACESCORE_SRC:-}" ]]; then
        cp -r "$RLFH_FACESCORE_SRC" "$SRC"
    else
        git clone --depth 1 https://github.com/OPPO-Mente-Lab/FaceScore "$SRC"
    fi
fi

"$VENV/bin/python" - <<'PY'
import cv2, ImageReward, clip, fairscale, timm, torch, transformers  # noqa: F401 (import check)
print("reference env ok: torch", torch.__version__, "transformers", transformers.__version__)
PY
