#!/usr/bin/env bash
# The CPU benchmark in one command: every headline ratio of issue 13, each the median of paired
# measurements taken in this run, in OUT_DIR/cpu_summary.json (machine, date, headlines, raw rows,
# per-stage wall times, the per-bench JSON paths).
#
#   bash bench/cpu.sh OUT_DIR            # ~12 min on 2 quiet cores (limit 15) + ~4 min per other family;
#                                        # per-bench JSON in OUT_DIR/cpu_sh/
#   bash bench/cpu.sh --smoke [OUT_DIR]  # ~1.5 min: every stage at tiny settings, default OUT_DIR a temp dir
#   bash bench/cpu.sh --family sd15 OUT_DIR   # one family's stages only (sdxl: the four below), summary in
#                                             # OUT_DIR/cpu_summary_sd15.json (sdxl: cpu_summary.json)
#   PYTHON=/path/to/python bash bench/cpu.sh OUT_DIR
#
# Headlines (>1 = rlfh faster, except the share): rollout_lora_ratio (stock pipeline without LoRA /
# rlfh Sampler with the merged LoRA, batch 16), learner_ratio (tiny, 64 px) and learner_ratio_large
# (256 px, 4 pairs, compute-bound) (rlfh step with learner.engine.compile / reference DPO loop, as pairs/s;
# the eager rlfh step's ratios beside them), ddpo_window_speedup (all 10
# steps / a 2-step SDE window, items/s), reward_http_overhead_share ((HTTP - in-process) / in-process,
# FaceScore-size model, batch 8). One torch thread everywhere (see bench/NOTES.md).
# Each family beside SDXL (FAMILIES below) gets two stages on its tiny model, rollout_<family> and
# learner_<family>, with the same two headlines in cpu_summary.json's "families" (targets: rollout_lora_ratio
# >= 0.97, learner_ratio >= 1.0).
set -euo pipefail
CALLER_DIR=$PWD
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[[ -x "$PY" ]] || PY=python
# The families beside SDXL whose sampler and learner are measured (bench/common.py: BENCH_FAMILIES)
FAMILIES=(sd15 sd3)
SMOKE="" OUT_DIR="" FAMILY=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --smoke) SMOKE=1 ;;
    --family) [[ $# -ge 2 ]] || { echo "--family needs a value: sdxl ${FAMILIES[*]}" >&2; exit 2; }
      FAMILY="$2"; shift ;;
    -h|--help) sed -n 2,23p "$0"; exit 0 ;;
    -*) echo "unknown option $1" >&2; exit 2 ;;
    *) OUT_DIR="$1"; [[ "$OUT_DIR" == /* ]] || OUT_DIR="$CALLER_DIR/$OUT_DIR" ;;
  esac
  shift
done
if [[ -n "$SMOKE" ]]; then
  OUT_DIR=${OUT_DIR:-$(mktemp -d -t rlfh-cpu-smoke-XXXX)}
elif [[ -z "$OUT_DIR" ]]; then
  echo "usage: bash bench/cpu.sh OUT_DIR | --smoke [OUT_DIR]" >&2; exit 2
fi
if [[ -n "$FAMILY" && "$FAMILY" != sdxl && ! " ${FAMILIES[*]} " =~ " $FAMILY " ]]; then
  echo "--family $FAMILY: cpu.sh measures sdxl ${FAMILIES[*]}" >&2; exit 2
fi
RUN_SDXL=1
if [[ -n "$FAMILY" ]]; then
  if [[ "$FAMILY" == sdxl ]]; then FAMILIES=(); else RUN_SDXL=""; FAMILIES=("$FAMILY"); fi
fi
SUB="$OUT_DIR/cpu_sh"
mkdir -p "$SUB"
# stage times per family, so that one family's run leaves the others' as they were
if [[ -n "$RUN_SDXL" ]]; then : > "$SUB/stage_times.tsv"; fi
for fam in "${FAMILIES[@]}"; do : > "$SUB/stage_times_$fam.tsv"; done

# Settings per stage, and the time each is budgeted on 2 quiet cores (from the committed results'
# per-call timings, measured under load 6-26, scaled to a quiet machine; see bench/NOTES.md).
if [[ -n "$SMOKE" ]]; then
  ROLLOUT=(--smoke)
  LEARNER=(--smoke --large-size 96 --large-repeats 2)  # no compile: its test covers it, and it costs minutes
  # not ddpo_bench's --smoke: its 4 items per round no longer divide tiny.yaml's sample_batch_size_per_actor 8
  DDPO=(--steps 4 --window 1 --items 8 --repeats 1)
  REWARD=(--smoke)
  FAMILY_ROLLOUT=(--smoke)
  FAMILY_LEARNER=(--smoke)
else
  # batch 16 only (the headline batch): 4 variants x (1 warm-up + 9) calls of 0.7-3 s
  ROLLOUT=(--batch-sizes 16 --repeats 9)
  # lora8 only: reference loop, rlfh eager and rlfh compiled (learner.engine.compile; one inductor compile
  # per size, ~2.5 min each on 2 cores with a cold cache, ~20 s warm), 17 tiny steps of ~0.1 s each,
  # then 10 steps of ~1 s at 256 px with 4 pairs (the compute-bound point: >= 1 s per step)
  LEARNER=(--modes lora8 --repeats 16 --large-size 256 --large-pairs 4 --large-repeats 9 --rlfh-compile)
  # 10 pairs (full, window) of 4-11 s after a warm-up pair
  DDPO=(--repeats 9)
  # ViT-L build/save/load ~30 s, server start + replica load ~25 s, 3 paths x (1 + 5) calls of ~8 s
  REWARD=(--quick)
  # per other family: the headline batch as for SDXL; the learner's lora8 at 64 px, eager and compiled
  FAMILY_ROLLOUT=(--batch-sizes 16 --repeats 9)
  FAMILY_LEARNER=(--modes lora8 --repeats 16 --large-size 0 --rlfh-compile)
fi
echo "[cpu.sh] out=$OUT_DIR smoke=${SMOKE:-no} python=$PY  $(date -u +%FT%TZ)  load: $(cut -d' ' -f1-3 /proc/loadavg)"
cat <<EOF
[cpu.sh] time budget (2 quiet cores; smoke: ~30-60 s each)
  stage      budget   settings
  rollout     2 min   ${ROLLOUT[*]}
  learner     6 min   ${LEARNER[*]}
  ddpo        3 min   ${DDPO[*]}
  reward      4 min   ${REWARD[*]}
  summary    <5 s
  total      15 min   (limit 15; estimated ~12 min on 2 quiet cores with a cold compile cache)
  per family beside SDXL (${FAMILIES[*]:-none}): rollout ~1 min, learner ~3 min (one compile)
  this run: ${RUN_SDXL:+sdxl }${FAMILIES[*]}
EOF

stage() {  # stage NAME TIMES CMD...: run, log to $SUB/log_NAME.txt, record wall seconds in TIMES
  local name=$1 times=$2; shift 2
  local t0=$SECONDS
  echo "[cpu.sh] == $name: $*"
  set +e  # a failing stage is recorded (exit code in stage_times.tsv, null headline) and the rest still run
  "$@" 2>&1 | tee "$SUB/log_$name.txt" | grep --line-buffered -E '^\[(bench|rollout|learner|ddpo|summary)\]'
  local rc=${PIPESTATUS[0]}
  set -e
  echo -e "$name\t$((SECONDS - t0))\t$rc" >> "$times"
  echo "[cpu.sh] == $name: $((SECONDS - t0)) s (exit $rc)"
}
if [[ -n "$RUN_SDXL" ]]; then
  T="$SUB/stage_times.tsv"
  stage rollout "$T" "$PY" bench/rollout_bench.py "${ROLLOUT[@]}" --no-compile --out-dir "$SUB"
  stage learner "$T" "$PY" bench/learner_bench.py "${LEARNER[@]}" --out-dir "$SUB"
  stage ddpo "$T" "$PY" bench/ddpo_bench.py "${DDPO[@]}" --out-dir "$SUB"
  stage reward "$T" "$PY" bench/reward_overhead_bench.py "${REWARD[@]}" --out-dir "$SUB"
fi
for fam in "${FAMILIES[@]}"; do
  T="$SUB/stage_times_$fam.tsv"
  stage "rollout_$fam" "$T" "$PY" bench/rollout_bench.py --family "$fam" "${FAMILY_ROLLOUT[@]}" --no-compile \
    --out-dir "$SUB"
  stage "learner_$fam" "$T" "$PY" bench/learner_bench.py --family "$fam" "${FAMILY_LEARNER[@]}" --out-dir "$SUB"
done
TIMES=()
if [[ -n "$RUN_SDXL" ]]; then
  SUMMARY="$OUT_DIR/cpu_summary.json"
  "$PY" bench/summarize.py --cpu-sh "$SUB" --out "$SUMMARY"
  TIMES+=("$SUB/stage_times.tsv")
else
  SUMMARY="$OUT_DIR/cpu_summary_$FAMILY.json"
  "$PY" bench/summarize.py --cpu-sh "$SUB" --family "$FAMILY" --out "$SUMMARY"
fi
echo "[cpu.sh] done in $SECONDS s: $SUMMARY"
for fam in "${FAMILIES[@]}"; do TIMES+=("$SUB/stage_times_$fam.tsv"); done
FAILED=$(awk -F'\t' '$3 != 0 {print $1}' "${TIMES[@]}" | tr '\n' ' ')
if [[ -n "$FAILED" ]]; then echo "[cpu.sh] FAILED stages: $FAILED(logs: $SUB/log_<stage>.txt)" >&2; exit 1; fi
