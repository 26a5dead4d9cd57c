#!/usr/bin/env bash
# GPU measurements of every model path (CLAP, captioners, re-rankers), as one prepared script that
# fits in 5 minutes on one H100/H200, random weights on full-size architectures, bf16 on the GPU.
#
#   OUT=/some/dir bash benchmarks/device_check.sh            # on the GPU machine ($OUT is given there)
#   OUT=/tmp/dc bash benchmarks/device_check.sh --cpu --tiny # CPU, tiny dims, Ray blocked (CI's dry run)
#   OUT=/tmp/dc bash benchmarks/device_check.sh --tiny       # GPU smoke test: tiny dims on CUDA (~1 min)
#   (DEVICE_CHECK_DRY_RUN=1 is --cpu --tiny; DEVICE_CHECK_CPU=1 / DEVICE_CHECK_TINY=1 are the flags)
#
# Sections (benchmarks/device_check.py says what each measures), most wanted first: env, clap_htsat
# (HTSAT-fused encoder, 10-s chunks/s with the torch CLAP features on the GPU), cross_encoder
# (pairs/s), listwise_lm (a Qwen2.5-7B-shaped listwise re-ranker, candidates/s), qwen2_audio_7b
# (+ seed 004's cost: TTFT, TPOT, peak memory), af3_7b, prefix_lm_7b, prefix_lm_1b_cost (issue 12's
# cost table). Each path also runs a small input through a reduced-size model of its architecture
# on CPU fp32 vs the device in fp32 (max |diff| <= 1e-3) and bf16 (cosine >= 0.99).
# On the GPU each section runs in its own process under `timeout`; a failing or killed section is
# recorded and the next one runs. A CPU dry run runs them all in one process (one torch import).
# Results: $OUT/device_check.jsonl (one JSON line per section, written as each ends),
# $OUT/device_check.md (a table, at the end), $OUT/device_check.log (everything printed).
#
# `import ray` fails in every section (a blocker package goes first on PYTHONPATH): the GPU machine
# has no Ray, so a CPU run proves no section needs it.
#
# Needs python3 with torch + transformers; not Ray, not an installed larcq_ray (the repo root goes on
# PYTHONPATH). larcq_ray's caption modules need pydantic, which the GPU machine's image lacks: carry it
# as wheels in .whl (ignored by git) and this script installs them into /tmp before the sections run:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 -d .whl pydantic==2.14.4 \
#     pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions==4.16.0
# (~2.8 MB; the versions the venv has; pydantic 2.14 needs typing-extensions >= 4.16), then name .whl
# in the device run's carry. Without them prefix_lm_7b is skipped and the ALM sections run through a
# direct processor + generate path instead of larcq_ray's backend (recorded in the figures).
#
# Environment: OUT (default ./device_check_out), PYTHON (default: .venv/bin/python if present, else
# python3), DEVICE_CHECK_DRY_RUN=1, DEVICE_CHECK_CPU=1, DEVICE_CHECK_TINY=1, DEVICE_CHECK_WHEELS
# (default .whl), DEVICE_CHECK_SECTIONS (a space-separated subset), DEVICE_CHECK_TOTAL_S (default
# 295: the whole script's budget).
set -u
for arg in "$@"; do
  case "$arg" in
    --cpu) export DEVICE_CHECK_CPU=1 ;;
    --tiny) export DEVICE_CHECK_TINY=1 ;;
    -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
    *) echo "device_check.sh: unknown argument $arg (use --cpu, --tiny)" >&2; exit 2 ;;
  esac
done
if [ "${DEVICE_CHECK_CPU:-0}" = 1 ] && [ "${DEVICE_CHECK_TINY:-0}" = 1 ]; then export DEVICE_CHECK_DRY_RUN=1; fi
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 2
OUT="${OUT:-$ROOT/device_check_out}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
LOG="$OUT/device_check.log"
: >"$OUT/device_check.jsonl"
: >"$LOG"
if [ -z "${PYTHON:-}" ]; then
  if [ -x "$ROOT/.venv/bin/python" ]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON="$(command -v python3 || echo python3)"; fi
fi
HELPER="$ROOT/benchmarks/device_check.py"
TOTAL_S="${DEVICE_CHECK_TOTAL_S:-295}"
START=$SECONDS

say() { echo "[device_check] $*" | tee -a "$LOG"; }

# Carried wheels (pydantic and its needs on the GPU machine): installed once into a private folder.
WHEELS="${DEVICE_CHECK_WHEELS:-$ROOT/.whl}"
SITE=""
if [ -d "$WHEELS" ] && ls "$WHEELS"/*.whl >/dev/null 2>&1; then
  SITE="${TMPDIR:-/tmp}/device_check_site"
  if timeout 60 "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
       --target "$SITE" "$WHEELS"/*.whl >>"$LOG" 2>&1; then
    say "installed carried wheels from $WHEELS into $SITE"
  else
    say "could not install the wheels in $WHEELS (see $LOG); going on without them"
    SITE=""
  fi
fi
WORK="$(mktemp -d "${TMPDIR:-/tmp}/device_check.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
# The Ray blocker: a package named ray, first on the path, whose import fails.
mkdir -p "$WORK/noray/ray"
echo 'raise ImportError("ray is blocked in the device check: the GPU machine has no Ray")' >"$WORK/noray/ray/__init__.py"
export PYTHONPATH="$WORK/noray:${SITE:+$SITE:}$ROOT${PYTHONPATH:+:$PYTHONPATH}" DEVICE_CHECK_SITE="$SITE"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 \
  TOKENIZERS_PARALLELISM=false TRANSFORMERS_VERBOSITY=error HF_HUB_DISABLE_PROGRESS_BARS=1 PYTORCH_CUDA_ALLOC_CONF="${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}"

case "${DEVICE_CHECK_DRY_RUN:-}" in
  ""|0|false|no) ;;
  *) export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" MKL_NUM_THREADS="${MKL_NUM_THREADS:-1}" \
       OPENBLAS_NUM_THREADS="${OPENBLAS_NUM_THREADS:-1}" ;;  # tiny models: threads only contend
esac

say "root $ROOT, out $OUT, python $PYTHON, dry run '${DEVICE_CHECK_DRY_RUN:-}'"
if ! "$PYTHON" "$HELPER" deps 2>&1 | tee -a "$LOG"; then
  say "python could not run the helper"
fi
command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version \
  --format=csv,noheader 2>&1 | sed 's/^/[device_check] nvidia-smi: /' | tee -a "$LOG"

# Per-section caps (seconds): 15 + 40 + 25 + 35 + 55 + 45 + 50 + 25 = 290 <= 5 minutes; each is
# also cut to what is left. Each section process pays ~10 s of imports and CUDA start.
SECTIONS="${DEVICE_CHECK_SECTIONS:-env clap_htsat cross_encoder listwise_lm qwen2_audio_7b af3_7b prefix_lm_7b prefix_lm_1b_cost}"
cap_of() {
  case "$1" in
    env) echo 15 ;; clap_htsat) echo 40 ;; cross_encoder) echo 25 ;; listwise_lm) echo 35 ;;
    qwen2_audio_7b) echo 55 ;; af3_7b) echo 45 ;; prefix_lm_7b) echo 50 ;; prefix_lm_1b_cost) echo 25 ;;
    *) echo 30 ;;
  esac
}
case "${DEVICE_CHECK_DRY_RUN:-}" in ""|0|false|no) ONE_PROCESS=0 ;; *) ONE_PROCESS=1 ;; esac
if [ "$ONE_PROCESS" = 1 ]; then
  # CPU dry run: one process for every section (imports once); the whole budget caps it.
  say "sections $SECTIONS in one process (CPU dry run, cap ${TOTAL_S} s)"
  # shellcheck disable=SC2086
  timeout -k 5 "$TOTAL_S" "$PYTHON" "$HELPER" sections $SECTIONS --out "$OUT" --work "$WORK" 2>&1 | tee -a "$LOG"
  rc=${PIPESTATUS[0]}
  for s in $SECTIONS; do
    "$PYTHON" "$HELPER" finish "$s" --out "$OUT" --rc "$rc" --cap "$TOTAL_S" 2>&1 | tee -a "$LOG"
  done
  SECTIONS=""
fi
for s in $SECTIONS; do
  cap=$(cap_of "$s")
  left=$((TOTAL_S - (SECONDS - START) - 5))
  if [ "$left" -lt 15 ]; then
    "$PYTHON" "$HELPER" skip "$s" --out "$OUT" --reason "out of the script's ${TOTAL_S} s budget" 2>&1 | tee -a "$LOG"
    continue
  fi
  [ "$cap" -gt "$left" ] && cap=$left
  say "section $s (cap ${cap} s, $((SECONDS - START)) s elapsed)"
  timeout -k 5 "$cap" "$PYTHON" "$HELPER" section "$s" --out "$OUT" --work "$WORK" 2>&1 | tee -a "$LOG"
  rc=${PIPESTATUS[0]}
  "$PYTHON" "$HELPER" finish "$s" --out "$OUT" --rc "$rc" --cap "$cap" 2>&1 | tee -a "$LOG"
  rm -rf "${WORK:?}/$s"
done

"$PYTHON" "$HELPER" report --out "$OUT" 2>&1 | tee -a "$LOG"
rc=${PIPESTATUS[0]}
say "done in $((SECONDS - START)) s (exit $rc: 1 when a section failed)"
exit "$rc"
