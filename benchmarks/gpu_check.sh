#!/usr/bin/env bash
# GPU check: on one CUDA GPU, within about 8 minutes,
#   1. the gpu-marked tests           (pytest -m gpu)
#   2. a SmolLM2 CounterFact stream   (1,000 edits in batches of 100, per-stage timings)
#   3. benchmarks/scale.py            (the full 32-layer Llama-3-8B shape, bf16 model, on cuda)
# and one summary table at the end.
#
#   bash benchmarks/gpu_check.sh             # on the GPU machine, from the repository root
#   bash benchmarks/gpu_check.sh --dry-run   # the same steps on CPU with tiny settings (CI)
#
# Output folder: $GPU_CHECK_OUT, else $OUT/gpu_check, else ./gpu_check_out (logs and JSON figures).
# Per-step time limits (seconds): GPU_CHECK_TESTS_S, GPU_CHECK_STREAM_S, GPU_CHECK_SCALE_S.
# The venv: .venv if it exists; otherwise one is made (with the system site packages, so a
# preinstalled CUDA torch is used) and the package installed into it, as `make venv` would.
set -u
cd "$(dirname "$0")/.."

DRY=0
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY=1 ;;
    -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
    *) echo "unknown argument: $arg" >&2; exit 2 ;;
  esac
done

if [ -n "${GPU_CHECK_OUT:-}" ]; then RESULTS="$GPU_CHECK_OUT"
elif [ -n "${OUT:-}" ]; then RESULTS="$OUT/gpu_check"
else RESULTS="gpu_check_out"; fi
mkdir -p "$RESULTS"

# -- the venv --------------------------------------------------------------------------------------
PY=.venv/bin/python
if ! [ -x "$PY" ] || ! "$PY" -c "import torch, rlsedit_llm" >/dev/null 2>&1; then
  echo "== building .venv ==" 
  if ! [ -x "$PY" ]; then
    python3 -m venv --system-site-packages .venv || { echo "cannot create .venv" >&2; exit 1; }
  fi
  if "$PY" -c "import torch" >/dev/null 2>&1; then
    # torch is already there (a CUDA build from the system): install only this package
    "$PY" -m pip install --no-build-isolation --no-deps -e . >"$RESULTS/venv.log" 2>&1 \
      || "$PY" -m pip install -e '.[dev]' >>"$RESULTS/venv.log" 2>&1
  else
    make venv >"$RESULTS/venv.log" 2>&1 || { echo "make venv failed (see $RESULTS/venv.log)" >&2; exit 1; }
  fi
fi

if [ "$DRY" = 1 ]; then
  DEVICE=cpu
  TESTS_S=${GPU_CHECK_TESTS_S:-120}; STREAM_S=${GPU_CHECK_STREAM_S:-120}; SCALE_S=${GPU_CHECK_SCALE_S:-120}
  STREAM_ARGS=(--stream --stream-model tiny --edits 6 --batch 3 --stats-tokens 500 --device cpu --threads 1)
  SCALE_ARGS=(--quick --device cpu --threads 1 --layers 2 --dtype float32)
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
else
  DEVICE=cuda
  TESTS_S=${GPU_CHECK_TESTS_S:-60}; STREAM_S=${GPU_CHECK_STREAM_S:-240}; SCALE_S=${GPU_CHECK_SCALE_S:-150}
  STREAM_ARGS=(--stream --stream-model smollm2 --edits 1000 --batch 100 --stats-tokens 100000 --device cuda)
  SCALE_ARGS=(--device cuda --layers 32 --dtype bfloat16 --state-dtype float64 --edit-layers 5 --batch 100
              --stats-tokens 20000 --value-steps 10)
  if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "no CUDA device visible to $PY (use --dry-run on a CPU machine)" >&2
    exit 1
  fi
fi

NAMES=(); STATUS=(); SECS=(); DETAIL=()
step() {  # step NAME LIMIT LOG command...
  local name="$1" limit="$2" log="$3"; shift 3
  echo "== $name (limit ${limit} s) =="
  local tic=$SECONDS rc
  timeout --kill-after=10 "$limit" "$@" >"$log" 2>&1
  rc=$?
  tail -n 25 "$log"
  local status=PASS
  if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then status="FAIL (timeout)"
  elif [ "$rc" != 0 ]; then status="FAIL (rc $rc)"; fi
  NAMES+=("$name"); STATUS+=("$status"); SECS+=($((SECONDS - tic)))
}

"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), \
torch.cuda.get_device_name() if torch.cuda.is_available() else '')"

step "pytest -m gpu" "$TESTS_S" "$RESULTS/tests.log" "$PY" -m pytest -q -p no:cacheprovider -m gpu tests/llm
DETAIL+=("$(grep -Eo '[0-9]+ (passed|failed|skipped|deselected|error)[^=]*' "$RESULTS/tests.log" | tail -n 1)")

step "counterfact stream" "$STREAM_S" "$RESULTS/stream.log" \
  "$PY" benchmarks/scale.py "${STREAM_ARGS[@]}" --json "$RESULTS/stream.json"
DETAIL+=("$(grep -E '^final efficacy' "$RESULTS/stream.log" | tr -d '|')")

step "scale.py (8B shape)" "$SCALE_S" "$RESULTS/scale.log" \
  "$PY" benchmarks/scale.py "${SCALE_ARGS[@]}" --json "$RESULTS/scale.json"
DETAIL+=("$(grep -E '^target|^total' "$RESULTS/scale.log" | sed 's/target (in place within 1.5x of the floor, torch./in place vs floor /' | tr '\n|' '; ')")
if [ "$DRY" = 1 ]; then NAMES[2]="scale.py (quick)"; fi

echo
echo "GPU CHECK SUMMARY ($([ "$DRY" = 1 ] && echo 'dry run, CPU, tiny settings' || echo "$DEVICE"))"
echo "| step | status | seconds | detail |"
echo "|---|---|---|---|"
failed=0
for i in "${!NAMES[@]}"; do
  echo "| ${NAMES[$i]} | ${STATUS[$i]} | ${SECS[$i]} | ${DETAIL[$i]:-} |"
  case "${STATUS[$i]}" in FAIL*) failed=1 ;; esac
done
echo "logs and JSON figures: $RESULTS"
exit $failed
