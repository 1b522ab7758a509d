#!/usr/bin/env bash
# Every benchmark appropriate for the device found, results as JSON under bench/results/.
# The issue-13 headlines in one command each: bash bench/cpu.sh OUT_DIR (CPU, <15 min) and
# bash bench/gpu.sh OUT_DIR (one H100/H200, <8 min); see bench/NOTES.md "One command".
#
#   bash bench/run_all.sh            # GPU: SDXL-arch (random weights) 1024 px -> gpu_*.json
#                                    # CPU: tiny model 64 px + the Ray round split -> cpu_tiny_*.json
#   bash bench/run_all.sh --smoke    # seconds per script, every code path, results in a temp dir
#   bash bench/run_all.sh --only rollout|compile|learner|round|colocate|reward|summary   # one stage (a remote GPU machine's
#                                    # 10-minute command limit: one stage per call on GPU, see NOTES.md)
#   OUT_DIR=/some/dir PYTHON=python3 bash bench/run_all.sh   # elsewhere / another interpreter
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
SMOKE="" ONLY=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --smoke) SMOKE="--smoke" ;;
    --only) ONLY="$2"; shift ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done
if [[ -n "$SMOKE" ]]; then OUT_DIR=${OUT_DIR:-$(mktemp -d -t rlfh-bench-smoke-XXXX)}; else OUT_DIR=${OUT_DIR:-bench/results}; fi
GPU=$($PY -c "import torch; print(int(torch.cuda.is_available()))")
echo "[run_all] gpu=$GPU smoke=${SMOKE:-no} only=${ONLY:-all} out=$OUT_DIR"
want() { [[ -z "$ONLY" || "$ONLY" == "$1" ]]; }

want rollout && $PY bench/rollout_bench.py $SMOKE --profile --no-compile --out-dir "$OUT_DIR"
# compile cost and compiled throughput, apart from the a/b ratio (GPU only: inductor on 2 CPU cores
# takes minutes and says little about the GPU)
[[ "$GPU" == "1" && -z "$SMOKE" ]] && want compile && $PY bench/rollout_bench.py --compile --batch-sizes 16 \
  --lora-rank 0 --out-dir "$OUT_DIR"
want learner && $PY bench/learner_bench.py $SMOKE --profile --out-dir "$OUT_DIR"
# the Ray round split is a CPU/tiny measurement (a GPU loop needs a multi-GPU config and Ray there)
[[ "$GPU" == "0" ]] && want round && $PY bench/round_bench.py $SMOKE --out-dir "$OUT_DIR"
# one device for rollout and learner: colocated (one UNet + handover) vs separate (two UNets), no Ray
if [[ "$GPU" == "1" ]]; then
  want colocate && $PY bench/colocate_bench.py $SMOKE --model sdxl-arch --out-dir "$OUT_DIR"
else
  want colocate && $PY bench/colocate_bench.py $SMOKE --out-dir "$OUT_DIR"
fi
# the reward server's HTTP / handle overhead against a FaceScore-size model (CPU: the server is a CPU path here)
[[ "$GPU" == "0" ]] && want reward && $PY bench/reward_overhead_bench.py $SMOKE --quick --out-dir "$OUT_DIR"
want summary && $PY bench/summarize.py --dir "$OUT_DIR" ${SMOKE:+--prefix smoke_}
echo "[run_all] done"
