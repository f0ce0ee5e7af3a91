#!/usr/bin/env bash
# GPU check: on one CUDA GPU, within about 8 minutes,
#   1. the gpu-marked tests           (pytest -m gpu)
#   2. a SmolLM2 CounterFact stream   (1,000 edits in batches of 100, per-stage timings)
#   3. benchmarks/scale.py            (the full 32-layer Llama-3-8B shape, bf16 model, on cuda)
# and one summary table at the end. Opt-in benches on SmolLM2 (rlsedit bench, time-budgeted and
# resumable: rerun a step to continue it; results in $RESULTS/<step>):
#   bench  every method, 1,000 full-schema CounterFact edits in batches of 100
#   long   RLSEdit, AlphaEdit and MEMIT on their own values, 3,000 simplified-CounterFact edits,
#          every edit re-scored at 1,000, 2,000 and 3,000
#   zsre   the same three methods on all 887 zsRE records
#   compare  issue 28's comparison: 1,000 full-schema CounterFact edits in batches of 100 on each of
#          the streams in GPU_CHECK_COMPARE_STREAMS (default 0,1,2), every rival at its released and
#          default settings with and without NAS norm anchors (rlsedit, memit, alphaedit,
#          alphaedit@released, encore, each also +nas), then benchmarks/leaderboard.py over the
#          streams (intervals, paired wins); each stream is its own resumable bench in
#          $RESULTS/compare_s<S>
# Opt-in steps at the paper's scale (benchmarks/gpu_scale.py; JSON in $RESULTS/<step>.json):
#   edit10k  SmolLM2, 10,000 simplified-CounterFact edits in batches of 100: s/edit by stage, then
#            every edit written scored once (efficacy, top-1); stops editing at a batch boundary
#            after GPU_CHECK_EDIT10K_BUDGET s (default 240) and scores what it wrote
#   big8b    one edit of 100 facts on the 32-layer Llama-3-8B shape with Llama-3's vocabulary
#            (128,256) and the published value settings (25 steps): s/edit, peak CUDA memory
#
#   bash benchmarks/gpu_check.sh             # on the GPU machine, from the repository root
#   bash benchmarks/gpu_check.sh --dry-run   # the same steps on CPU with tiny settings (CI)
#   bash benchmarks/gpu_check.sh --steps tests,scale   # only some steps (tests, stream, scale, bench, long, zsre,
#                                                      # compare, edit10k, big8b)
#
# Output folder: $GPU_CHECK_OUT, else $OUT/gpu_check, else ./gpu_check_out (logs and JSON figures).
# Per-step time limits (seconds): GPU_CHECK_TESTS_S, GPU_CHECK_STREAM_S, GPU_CHECK_SCALE_S, GPU_CHECK_BENCH_S
# (each of bench, long and zsre), GPU_CHECK_EDIT10K_S, GPU_CHECK_BIG8B_S. GPU_CHECK_EDIT10K_ARGS adds
# arguments to the edit10k run (e.g. "--optimizer lbfgs" or "--stop-top1").
# The Python: .venv if it imports torch and the package; else a python3 that already has torch
# (a GPU image's CUDA build) with this checkout on PYTHONPATH; else `make venv` builds .venv.
set -u
cd "$(dirname "$0")/.."

DRY=0
STEPS=tests,stream,scale
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --steps) shift; STEPS="${1:-}" ;;
    -h|--help) sed -n '2,29p' "$0"; exit 0 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
  shift
done
for s in ${STEPS//,/ }; do
  case "$s" in tests|stream|scale|bench|long|zsre|compare|edit10k|big8b) ;;
    *) echo "--steps takes tests, stream, scale, bench, long, zsre, compare, edit10k, big8b; got '$s'" >&2; exit 2 ;; esac
done
wanted() { case ",$STEPS," in *",$1,"*) return 0 ;; *) return 1 ;; esac; }

if [ -n "${GPU_CHECK_OUT:-}" ]; then RESULTS="$GPU_CHECK_OUT"
elif [ -n "${OUT:-}" ]; then RESULTS="$OUT/gpu_check"
else RESULTS="gpu_check_out"; fi
mkdir -p "$RESULTS"

# -- the Python ------------------------------------------------------------------------------------
PY=.venv/bin/python
if [ -x "$PY" ] && "$PY" -c "import torch, rlsedit_llm" >/dev/null 2>&1; then
  :
elif python3 -c "import torch" >/dev/null 2>&1; then
  # A GPU image's own torch (a venv made from it would not see it): run from this checkout.
  PY=python3
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
  echo "== building .venv =="
  make venv >"$RESULTS/venv.log" 2>&1 || { echo "make venv failed (see $RESULTS/venv.log)" >&2; exit 1; }
fi

if [ "$DRY" = 1 ]; then
  DEVICE=cpu
  TESTS_S=${GPU_CHECK_TESTS_S:-120}; STREAM_S=${GPU_CHECK_STREAM_S:-120}; SCALE_S=${GPU_CHECK_SCALE_S:-120}
  STREAM_ARGS=(--stream --stream-model tiny --edits 6 --batch 3 --stats-tokens 500 --device cpu --threads 1)
  SCALE_ARGS=(--quick --device cpu --threads 1 --layers 2 --dtype float32)
  BENCH_S=${GPU_CHECK_BENCH_S:-240}
  BENCH_ARGS=(--device cpu --model "$RESULTS/tiny_model" --dataset counterfact --edits 4 --batch 2 --stats-tokens 500
              --methods rlsedit,memit,encore,ultraedit --shadow memit --checkpoints 1 --fluency-cases 0)
  LONG_ARGS=(--device cpu --model "$RESULTS/tiny_model" --dataset counterfact_simple --edits 6 --batch 2
             --stats-tokens 500 --methods rlsedit,alphaedit,memit --checkpoints 1 --fluency-cases 0 --score-all-at 2,4)
  ZSRE_ARGS=(--device cpu --model "$RESULTS/tiny_model" --dataset zsre --edits 4 --batch 2 --stats-tokens 500
             --methods rlsedit,alphaedit,memit --checkpoints 1 --fluency-cases 0)
  COMPARE_ARGS=(--device cpu --model "$RESULTS/tiny_model" --dataset counterfact --edits 4 --batch 2 --stats-tokens 500
                --methods rlsedit,rlsedit+nas,alphaedit@released --nas-reference-facts 4 --checkpoints 1
                --fluency-cases 0)
  COMPARE_STREAMS=${GPU_CHECK_COMPARE_STREAMS:-0,1}
  EDIT10K_S=${GPU_CHECK_EDIT10K_S:-120}; BIG8B_S=${GPU_CHECK_BIG8B_S:-120}
  EDIT10K_ARGS=(edit10k --dry-run --profile-batch 2)   # CPU: tiny model, 20 facts in batches of 10
  BIG8B_ARGS=(big8b --dry-run)       # CPU: tiny widths, 2 layers, vocabulary 1,024, 10 facts
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
else
  DEVICE=cuda
  TESTS_S=${GPU_CHECK_TESTS_S:-60}; STREAM_S=${GPU_CHECK_STREAM_S:-240}; SCALE_S=${GPU_CHECK_SCALE_S:-150}
  STREAM_ARGS=(--stream --stream-model smollm2 --edits 1000 --batch 100 --stats-tokens 100000 --device cuda)
  SCALE_ARGS=(--device cuda --layers 32 --dtype bfloat16 --state-dtype float64 --edit-layers 5 --batch 100
              --stats-tokens 4096 --value-steps 10 --blocks 1024,2048,4096)
  BENCH_S=${GPU_CHECK_BENCH_S:-540}
  BENCH_ARGS=(--device cuda --model smollm2 --dataset counterfact --edits 1000 --batch 100
              --methods rlsedit,alphaedit,memit,memit_seq,encore,ultraedit --shadow alphaedit,memit,memit_seq
              --checkpoints 3 --fluency-cases 10)
  LONG_ARGS=(--device cuda --model smollm2 --dataset counterfact_simple --edits 3000 --batch 100
             --methods rlsedit,alphaedit,memit --checkpoints 6 --fluency-cases 10 --score-all-at 1000,2000)
  ZSRE_ARGS=(--device cuda --model smollm2 --dataset zsre --edits 887 --batch 100
             --methods rlsedit,alphaedit,memit --checkpoints 3 --fluency-cases 10)
  COMPARE_ARGS=(--device cuda --model smollm2 --dataset counterfact --edits 1000 --batch 100
                --methods rlsedit,rlsedit+nas,memit,memit+nas,alphaedit,alphaedit@released,alphaedit+nas,alphaedit@released+nas,encore,encore+nas
                --checkpoints 3 --fluency-cases 10)
  COMPARE_STREAMS=${GPU_CHECK_COMPARE_STREAMS:-0,1,2}
  # edit10k: 240 s of editing (about 1,700 edits at the H200's 0.14 s/edit with the published
  # optimiser), then the final scoring of every edit written; big8b: build, statistics, state and
  # one 100-fact edit. 330 + 240 s: both steps fit one 600 s call (--steps edit10k,big8b).
  EDIT10K_S=${GPU_CHECK_EDIT10K_S:-330}; BIG8B_S=${GPU_CHECK_BIG8B_S:-240}
  EDIT10K_ARGS=(edit10k --device cuda --model smollm2 --edits 10000 --batch 100 --stats-tokens 100000
                --time-budget "${GPU_CHECK_EDIT10K_BUDGET:-240}" --score-batch 256 --profile-batch 3)
  BIG8B_ARGS=(big8b --device cuda --layers 32 --edit-layers 5 --vocab 128256 --batch 100 --dtype bfloat16
              --state-dtype float64 --stats-tokens 4096)
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

if wanted tests; then
  step "pytest -m gpu" "$TESTS_S" "$RESULTS/tests.log" "$PY" -m pytest -q -p no:cacheprovider -m gpu tests/llm
  DETAIL+=("$(grep -Eo '[0-9]+ (passed|failed|skipped|deselected|error)[^=]*' "$RESULTS/tests.log" | tail -n 1)")
fi

if wanted stream; then
  step "counterfact stream" "$STREAM_S" "$RESULTS/stream.log" \
    "$PY" benchmarks/scale.py "${STREAM_ARGS[@]}" --json "$RESULTS/stream.json"
  DETAIL+=("$(grep -E '^final efficacy' "$RESULTS/stream.log" | tr -d '|')")
fi

if wanted scale; then
  step "scale.py ($([ "$DRY" = 1 ] && echo quick || echo 8B shape))" "$SCALE_S" "$RESULTS/scale.log" \
    "$PY" benchmarks/scale.py "${SCALE_ARGS[@]}" --json "$RESULTS/scale.json"
  DETAIL+=("$(grep -E '^target|^total' "$RESULTS/scale.log" | sed 's/target (in place within 1.5x of the floor, torch./in place vs floor /' | tr '\n|' '; ')")
fi

if wanted edit10k; then
  # shellcheck disable=SC2206  # GPU_CHECK_EDIT10K_ARGS is split into words on purpose
  step "edit10k ($([ "$DRY" = 1 ] && echo "tiny model" || echo SmolLM2), simplified CounterFact)" "$EDIT10K_S" "$RESULTS/edit10k.log" \
    "$PY" benchmarks/gpu_scale.py "${EDIT10K_ARGS[@]}" ${GPU_CHECK_EDIT10K_ARGS:-} --out "$RESULTS/edit10k.json"
  DETAIL+=("$(grep -E '^edits done|^final scores' "$RESULTS/edit10k.log" | tr '\n|' '; ')")
fi

if wanted big8b; then
  step "big8b ($([ "$DRY" = 1 ] && echo 'quick widths' || echo '8B shape, vocabulary 128,256'))" "$BIG8B_S" \
    "$RESULTS/big8b.log" "$PY" benchmarks/gpu_scale.py "${BIG8B_ARGS[@]}" --out "$RESULTS/big8b.json"
  DETAIL+=("$(grep -E '^  edit of' "$RESULTS/big8b.log" | sed 's/^ *//' | tr '\n|' '; ')")
fi

if wanted bench || wanted long || wanted zsre || wanted compare; then
  if [ "$DRY" = 1 ]; then  # the bench loads a model by name or folder: save a tiny random one
    "$PY" -c "import sys; from rlsedit_llm.adapters.tiny import tiny_model; m, t = tiny_model('llama'); \
m.save_pretrained(sys.argv[1]); t.save_pretrained(sys.argv[1])" "$RESULTS/tiny_model" >/dev/null 2>&1
  fi
fi
bench_step() {  # bench_step NAME TITLE args...: one time-budgeted, resumable rlsedit bench in $RESULTS/NAME
  local name="$1" title="$2"; shift 2
  # Stops at a batch boundary with BENCH_S/5 left for the final scoring; rerun the step to resume.
  step "$title" "$BENCH_S" "$RESULTS/$name.log" \
    "$PY" -m rlsedit_llm.cli bench "$@" --interleave --glue 0 --quiet --keep-state \
    --out "$RESULTS/$name" --time-budget $((BENCH_S * 4 / 5))
  DETAIL+=("$("$PY" -c "import json, sys; m = json.load(open(sys.argv[1]))['methods']; \
print(sum(r['done'] for r in m.values()), 'of', len(m), 'methods done at', min(r['edits_done'] for r in m.values()), 'edits')" \
    "$RESULTS/$name/results.json" 2>/dev/null); $RESULTS/$name/results.md")
}
wanted bench && bench_step bench "rlsedit bench (every method)" "${BENCH_ARGS[@]}"
wanted long && bench_step long "long stream (own values)" "${LONG_ARGS[@]}"
wanted zsre && bench_step zsre "zsRE stream (own values)" "${ZSRE_ARGS[@]}"
if wanted compare; then
  for S in ${COMPARE_STREAMS//,/ }; do
    bench_step "compare_s$S" "comparison, stream $S (released, default, +nas)" "${COMPARE_ARGS[@]}" --stream "$S"
  done
  step "leaderboard over the comparison's streams" 120 "$RESULTS/leaderboard.log" \
    "$PY" benchmarks/leaderboard.py "$RESULTS"/compare_s*/ --out "$RESULTS/leaderboard.md"
  DETAIL+=("$RESULTS/leaderboard.md")
fi

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
