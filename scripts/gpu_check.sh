#!/usr/bin/env bash
# One command for a GPU slot: GPU tests + every GPU figure of BENCHMARKS.md, <= 8 min on one
# H100/H200. Writes OUT/gpu_check.json, OUT/gpu_check.md (the table), OUT/gpu_tests.xml.
#
#   scripts/gpu_check.sh                      # on a CUDA machine (project installed: pip install -e .)
#   scripts/gpu_check.sh --out DIR            # results elsewhere (default results/gpu_check)
#   scripts/gpu_check.sh --cpu-smoke          # the same code at tiny sizes on the CPU (~1 min);
#                                             # tests/test_gpu_check.py runs it in the default suite
#   scripts/gpu_check.sh --no-tests --sections memory   # a rerun of what the budget skipped
#                                             # (other options go to scripts/gpu_check.py)
#   PYTHON=.venv/bin/python scripts/gpu_check.sh  # the interpreter to run (default python3)
#
# (a) pytest -m gpu tests/test_gpu.py (on the CPU with LLADA_GPU_TESTS_ON_CPU=1; the smoke skips
#     the 2-step SFT, whose entry point tests/test_train.py already runs on the CPU);
# (b)-(e) scripts/gpu_check.py: attention, training MFU, MoE layer, sampler vs HBM bound, ZeRO
#     memory. Exit status 0 only if every test and every section succeeded.
set -uo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-python3}
OUT=$REPO/results/gpu_check  # a relative --out is taken from the caller's directory
SMOKE=()
RUN_TESTS=1
EXTRA=()  # passed to gpu_check.py, e.g. --sections memory --peak-tflops 756
while [ $# -gt 0 ]; do
  case "$1" in
    --cpu-smoke) SMOKE=(--cpu-smoke); shift ;;
    --out) OUT=$2; shift 2 ;;
    --no-tests) RUN_TESTS=0; shift ;;
    -h|--help) sed -n 2,16p "$0"; exit 0 ;;
    *) EXTRA+=("$1"); shift ;;
  esac
done
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd) || exit 2
cd "$REPO"
export PYTHONUNBUFFERED=1 WANDB_MODE=offline
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PYTEST_ARGS=(-m gpu tests/test_gpu.py -q -p no:cacheprovider --junitxml "$OUT/gpu_tests.xml")
if [ ${#SMOKE[@]} -gt 0 ]; then
  export LLADA_GPU_TESTS_ON_CPU=1 DS_ACCELERATOR=cpu OMP_NUM_THREADS=1
  PYTEST_ARGS+=(-k "not sft")
else
  if ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "no CUDA device visible to torch: use --cpu-smoke" >&2
    exit 2
  fi
  export DS_ACCELERATOR=cuda
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
fi
start=$(date +%s)
tests_rc=0
rm -f "$OUT/gpu_tests.xml"
if [ $RUN_TESTS -eq 1 ]; then
  echo "== (a) GPU tests"
  "$PYTHON" -m pytest "${PYTEST_ARGS[@]}"
  tests_rc=$?
fi
echo "== (b)-(e) figures"
"$PYTHON" scripts/gpu_check.py "${SMOKE[@]}" --out "$OUT" --tests-junit "$OUT/gpu_tests.xml" \
  --budget-s "$(( 360 - ($(date +%s) - start) ))" "${EXTRA[@]}"  # no section starts after 6 min
check_rc=$?
echo "== done in $(( $(date +%s) - start )) s: tests rc $tests_rc, figures rc $check_rc; $OUT/gpu_check.md"
[ $tests_rc -eq 0 ] && [ $check_rc -eq 0 ]
