#!/usr/bin/env bash
# The GPU benchmark in one command, within 8 minutes on one H100/H200 (SDXL architecture, random
# weights, 1024 px, bf16): OUT_DIR/gpu_rollout.json, OUT_DIR/gpu_learner.json and
# OUT_DIR/gpu_summary.json (device, gpu, date, rollout_ratio, rollout_mfu, learner_ratio, learner_mfu,
# the raw rows).
#
#   bash bench/gpu.sh [OUT_DIR]       # default OUT_DIR bench/results
#   bash bench/gpu.sh --family sd3 [OUT_DIR]   # SD3.5 medium's architecture instead (random weights of its
#                                     # published config: MMDiT-X 24 blocks, 16-channel VAE, CLIP-L/G; no T5,
#                                     # see bench/common.py: build_sd35m_arch_random): OUT_DIR/gpu_sd3_*.json and
#                                     # gpu_sd3_summary.json, the same stages and budget as SDXL's beside it
#   bash bench/gpu.sh --dry-run       # print the install and bench commands, run nothing (any machine)
#   bash bench/gpu.sh --cpu-check [OUT_DIR]   # the same stages with the tiny model on CPU (plumbing only,
#                                     # ~1 min; default OUT_DIR a temp dir; no install, no compile)
#
# Installs the wheels it needs from .whl/ (built here by `bash bench/gpu_wheels.sh`: the GPU machine has
# no network; Python 3.12 there) into /tmp/rlfh-site, unless they import already.
#
# Stages (times on an H100, estimated: not yet run on a GPU). Each runs under its own timeout, so an
# overrun loses that stage only; the compile, the least predictable, runs last with what is left of
# the 8 minutes:
#   install   ~15 s
#   rollout  <=150 s  stock diffusers (a) vs rlfh Sampler eager (b), + LoRA r8 unmerged (c) and merged
#                     (d), batches 1 and 4, 20 steps, 2 rounds after a warm-up, alternating -> gpu_rollout.json
#   learner  <=150 s  reference-style Diffusion-DPO loop vs rlfh's learner, LoRA r8 and the full UNet,
#                     1 pair/step, 3 steps after a warm-up, alternating -> gpu_learner.json
#   compile  the rest (~150 s): the one compile: channels_last + Sampler.compile (reduce-overhead: CUDA
#                     graphs) of the merged-LoRA sampler at batch 4: compile time, steady speed against
#                     its eager time, images vs eager (it re-times a-d once at batch 4 first, ~30 s)
#                     -> gpu_rollout_compile.json
#   summary    ~1 s   -> gpu_summary.json
set -euo pipefail
CALLER_DIR=$PWD
cd "$(dirname "$0")/.."
DRY="" CPU_CHECK="" OUT_DIR="" FAMILY=sdxl
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --cpu-check) CPU_CHECK=1 ;;
    --family) [[ $# -ge 2 ]] || { echo "--family needs a value: sdxl sd3" >&2; exit 2; }
      FAMILY="$2"; shift ;;
    -h|--help) sed -n 2,31p "$0"; exit 0 ;;
    -*) echo "unknown option $1" >&2; exit 2 ;;
    *) OUT_DIR="$1"; [[ "$OUT_DIR" == /* ]] || OUT_DIR="$CALLER_DIR/$OUT_DIR" ;;
  esac
  shift
done
if [[ -n "$CPU_CHECK" ]]; then OUT_DIR=${OUT_DIR:-$(mktemp -d -t rlfh-gpu-check-XXXX)}; else OUT_DIR=${OUT_DIR:-bench/results}; fi
# per family: the published architecture with random weights, the results' prefix, the tiny model of --cpu-check
case "$FAMILY" in
  sdxl) MODEL=sdxl-arch-random PREFIX=gpu_ TINY=rlfh:tiny-sdxl ;;
  sd3) MODEL=sd35m-arch-random PREFIX=gpu_sd3_ TINY=rlfh:tiny-sd3 ;;
  *) echo "--family $FAMILY: gpu.sh measures sdxl sd3" >&2; exit 2 ;;
esac
PY=${PYTHON:-python3}
[[ -n "$CPU_CHECK" && -z "${PYTHON:-}" && -x .venv/bin/python ]] && PY=.venv/bin/python
ROLLOUT=("$PY" bench/rollout_bench.py --family "$FAMILY" --model "$MODEL" --dtype bfloat16 --size 1024 --steps 20
         --batch-sizes 1,4 --repeats 2 --lora-rank 8 --no-compile --out "${PREFIX}rollout" --out-dir "$OUT_DIR")
COMPILE=("$PY" bench/rollout_bench.py --family "$FAMILY" --model "$MODEL" --dtype bfloat16 --size 1024 --steps 20
         --batch-sizes 4 --repeats 1 --lora-rank 8 --compile --out "${PREFIX}rollout_compile" --out-dir "$OUT_DIR")
LEARNER=("$PY" bench/learner_bench.py --family "$FAMILY" --model "$MODEL" --dtype bfloat16 --size 1024 --pairs 1
         --modes lora8,full --repeats 3 --large-size 0 --out "${PREFIX}learner" --out-dir "$OUT_DIR")
TOTAL_S=${GPU_SH_TOTAL_S:-470}  # the whole script's budget (8 min less a margin)
if [[ -n "$CPU_CHECK" ]]; then  # later options win: tiny model, CPU, no compile
  CPU_ARGS=(--model "$TINY" --dtype float32 --size 64 --device cpu)
  ROLLOUT+=("${CPU_ARGS[@]}" --steps 2); COMPILE+=("${CPU_ARGS[@]}" --steps 2 --no-compile)
  LEARNER+=("${CPU_ARGS[@]}" --modes lora8 --repeats 2)
fi
SUMMARY=("$PY" bench/summarize.py --gpu-sh "$OUT_DIR" --family "$FAMILY" --out "$OUT_DIR/${PREFIX}summary.json")
TIMES="$OUT_DIR/${PREFIX#gpu_}stage_times.tsv"  # stage_times.tsv (SDXL), sd3_stage_times.tsv
INSTALL=("$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/rlfh-site)

if [[ -n "$DRY" ]]; then
  echo "[gpu.sh] dry run: family=$FAMILY out=$OUT_DIR"
  echo "  ${INSTALL[*]} .whl/*.whl   # only if diffusers/deepspeed/pydantic do not import"
  echo "  export PYTHONPATH=/tmp/rlfh-site:$PWD"
  echo "  timeout 150 ${ROLLOUT[*]}"
  echo "  timeout 150 ${LEARNER[*]}"
  echo "  timeout <rest of ${TOTAL_S} s> ${COMPILE[*]}"
  echo "  ${SUMMARY[*]}"
  ls .whl/*.whl >/dev/null 2>&1 && echo "[gpu.sh] wheels: $(ls .whl/*.whl | wc -l) in .whl/" \
    || echo "[gpu.sh] no .whl/ here: run bash bench/gpu_wheels.sh before carrying it to the GPU machine"
  exit 0
fi

mkdir -p "$OUT_DIR"
: > "$TIMES"
t0=$SECONDS
if [[ -n "$CPU_CHECK" ]]; then :
elif ! "$PY" -c "import diffusers, deepspeed, pydantic" 2>/dev/null; then
  ls .whl/*.whl >/dev/null 2>&1 || { echo "[gpu.sh] missing packages and no .whl/: run bash bench/gpu_wheels.sh here and carry .whl" >&2; exit 1; }
  "${INSTALL[@]}" .whl/*.whl
fi
export PYTHONPATH="/tmp/rlfh-site:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
echo -e "install\t$((SECONDS - t0))\t0" >> "$TIMES"
[[ -n "$CPU_CHECK" ]] || "$PY" -c "import torch; assert torch.cuda.is_available(), 'no GPU'; print('[gpu.sh]', torch.cuda.get_device_name(0), torch.__version__)"

stage() {  # stage NAME SECONDS CMD...: run under a timeout, log to OUT_DIR/log_NAME.txt, record wall time
  local name=$1 limit=$2; shift 2
  local s=$SECONDS
  echo "[gpu.sh] == $name (limit $limit s): $*"
  set +e
  timeout "$limit" "$@" 2>&1 | tee "$OUT_DIR/log_${PREFIX#gpu_}$name.txt"
  local rc=${PIPESTATUS[0]}
  set -e
  echo -e "$name\t$((SECONDS - s))\t$rc" >> "$TIMES"
  echo "[gpu.sh] == $name: $((SECONDS - s)) s (exit $rc)"
}
stage rollout 150 "${ROLLOUT[@]}"
stage learner 150 "${LEARNER[@]}"
REST=$((TOTAL_S - SECONDS))
if (( REST >= 90 )); then stage compile "$REST" "${COMPILE[@]}"
else echo "[gpu.sh] compile skipped: $REST s left of $TOTAL_S"; echo -e "compile\t0\t-1" >> "$TIMES"; fi
"${SUMMARY[@]}"
echo "[gpu.sh] done in $SECONDS s: $OUT_DIR/${PREFIX}summary.json (copy OUT_DIR's ${PREFIX}*.json into bench/results/)"
FAILED=$(awk -F'\t' '$3 != 0 {print $1}' "$TIMES" | tr '\n' ' ')
if [[ -n "$FAILED" ]]; then echo "[gpu.sh] FAILED or skipped stages: $FAILED(logs: $OUT_DIR/log_<stage>.txt)" >&2; exit 1; fi
