#!/usr/bin/env bash
# One command for a GPU slot: GPU tests + every GPU figure of BENCHMARKS.md + the scale checks of
# issue 28, <= 9.5 min on one H100/H200. Writes OUT/gpu_check.json, OUT/gpu_check.md (the table),
# OUT/gpu_tests.xml, OUT/scale_*.log.
#
#   scripts/gpu_check.sh                      # on a CUDA machine (pip install -e . done)
#   scripts/gpu_check.sh --out DIR            # results elsewhere (default results/gpu_check)
#   scripts/gpu_check.sh --cpu-smoke          # the same code at tiny sizes on the CPU (~1 min);
#                                             # tests/test_gpu_check.py runs it in the default suite
#   scripts/gpu_check.sh --no-tests --sections memory   # a rerun of what the budget skipped
#                                             # (other options go to scripts/gpu_check.py)
#   scripts/gpu_check.sh --scale-only         # (f)-(h) alone (with --cpu-smoke: at tiny sizes on
#                                             # the CPU, to check their plumbing; ~2 min)
#   PYTHON=.venv/bin/python scripts/gpu_check.sh  # the interpreter to run (default python3)
#
# (a) pytest -m gpu tests/test_gpu.py (on the CPU with LLADA_GPU_TESTS_ON_CPU=1; the smoke skips
#     the 2-step SFT, whose entry point tests/test_train.py already runs on the CPU);
# (b)-(e) scripts/gpu_check.py: attention, training MFU, MoE layer, sampler vs HBM bound, ZeRO
#     memory;
# (f)-(h) scale (issue 28), each under `timeout` and skipped once the 570 s budget is spent:
#     (f) layerwise rollout: ms per sampler-shaped forward (256-token prefix + a 32-token block)
#         at mini width (2 layers: 1 dense + 1 MoE), ZeRO-3 world 1, rollout.gather whole vs
#         layerwise, batch 1/8/32 (world 1: the "all-gather" is a local copy, so this is the
#         fetch/release overhead, not the network's cost; docs/scale.md has the cost model);
#     (g) memory plan vs measured: 3 CPT steps (every sequence is data.max_length long, as the
#         plan assumes) of a 4-layer model with mini's vocabulary, ZeRO-3, 1 GPU: the plan's peak
#         less its 3 GB runtime guess against torch.cuda.max_memory_allocated;
#     (h) EP parity, 1 process: the AutoEP block (use_grouped_mm on CUDA) against our SparseMoE
#         at mini width, test_autoep.py's three routing cases, fp32 (must agree to 1e-4) and
#         bf16 (printed): output and input-gradient relative errors, expert loads. The 2-process
#         EP=2 test of tests/test_autoep.py starts CPU processes only, so it is not run here.
#     Not in --cpu-smoke unless --scale-only is given (the default suite runs --cpu-smoke).
# Exit status 0 only if every test and every section succeeded.
set -uo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-python3}
OUT=$REPO/results/gpu_check  # a relative --out is taken from the caller's directory
SMOKE=()
RUN_TESTS=1
SCALE_ONLY=0
EXTRA=()  # passed to gpu_check.py, e.g. --sections memory --peak-tflops 756
while [ $# -gt 0 ]; do
  case "$1" in
    --cpu-smoke) SMOKE=(--cpu-smoke); shift ;;
    --out) OUT=$2; shift 2 ;;
    --no-tests) RUN_TESTS=0; shift ;;
    --scale-only) SCALE_ONLY=1; shift ;;
    -h|--help) sed -n 2,33p "$0"; exit 0 ;;
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
BUDGET_S=570  # the whole script: one device command is at most 600 s
tests_rc=0
check_rc=0
rm -f "$OUT/gpu_tests.xml"
if [ $SCALE_ONLY -eq 0 ]; then
  if [ $RUN_TESTS -eq 1 ]; then
    echo "== (a) GPU tests"
    "$PYTHON" -m pytest "${PYTEST_ARGS[@]}"
    tests_rc=$?
  fi
  echo "== (b)-(e) figures"
  "$PYTHON" scripts/gpu_check.py "${SMOKE[@]}" --out "$OUT" --tests-junit "$OUT/gpu_tests.xml" \
    --budget-s "$(( 360 - ($(date +%s) - start) ))" "${EXTRA[@]}"  # no section starts after 6 min
  check_rc=$?
fi

# ---------------------------------------------------------------- (f)-(h) scale (issue 28)
scale_rc=0
left() { echo $(( BUDGET_S - ($(date +%s) - start) )); }
# run_section NAME CAP_S FUNCTION: FUNCTION (in a child bash: `timeout` runs no shell function)
# under `timeout min(CAP_S, budget left)`, output to the terminal and OUT/scale_NAME.log;
# skipped (a failure) when under 20 s are left.
run_section() {
  local name=$1 cap=$2 limit rc
  shift 2
  limit=$(left)
  [ "$limit" -gt "$cap" ] && limit=$cap
  if [ "$limit" -lt 20 ]; then
    echo "  $name: skipped, past the ${BUDGET_S} s budget (rerun: gpu_check.sh --scale-only)"
    scale_rc=1
    return
  fi
  timeout --kill-after 10 "$limit" bash -c "$(declare -f "$1"); $1" 2>&1 \
    | tee "$OUT/scale_$name.log"
  rc=${PIPESTATUS[0]}
  [ "$rc" -eq 124 ] && echo "  $name: timed out after $limit s"
  [ "$rc" -ne 0 ] && scale_rc=1
  echo "  $name: rc $rc"
}

section_layerwise() {  # (f)
  "$PYTHON" - "$SCALE_SIZE" <<'PY'
import os, sys, time
import torch
sys.path.insert(0, "scripts")
import gpu_check  # noqa: E402  (model_config: mini widths, or tiny ones for the smoke)
from llada_train.config import DeepSpeedConfig, OptimConfig
from llada_train.distributed import create_engine, deepspeed_config, init_distributed
from llada_train.run import decoding

smoke = sys.argv[1] == "tiny"
info = init_distributed()  # a world of one
config = gpu_check.model_config(smoke, 2)  # layer 0 dense, layer 1 MoE
torch.manual_seed(0)
model = gpu_check.LLaDA2MoeModelLM(config)
layers = [sum(p.numel() for p in layer.parameters()) for layer in model.model.layers]
router = config.num_experts * config.hidden_size  # the largest weight kept resident
largest = max(p.numel() for p in model.parameters() if p.numel() > router)
zero = {  # the recipe rules of docs/scale.md ("Prefetch settings")
    "stage3_prefetch_bucket_size": max(layers),
    "stage3_max_live_parameters": 2 * max(layers) - largest,
    "stage3_param_persistence_threshold": router,
}
optim = OptimConfig(lr=1e-5)
precision = "fp32" if info.device.type == "cpu" else "bf16"
ds = deepspeed_config(DeepSpeedConfig(stage=3, overrides={"zero_optimization": zero}), optim,
                      1, 1, info.world_size, precision)
engine = create_engine(model, ds, optim, 10)
module = engine.module
prefix, block = (32, 8) if smoke else (256, 32)
batches, reps = ([1, 2], 2) if smoke else ([1, 8, 32], 5)
sync = torch.cuda.synchronize if info.device.type == "cuda" else (lambda: None)
print(f"layerwise rollout: {sum(layers) / 1e9:.2f}B parameters in {len(layers)} layers, "
      f"{prefix} + {block} tokens per row, {info.device}, {precision}", flush=True)
times = {}
for gather in ("whole", "layerwise"):
    for batch in batches:
        ids = torch.randint(3, config.vocab_size, (batch, prefix + block), device=info.device)
        sync()
        t0 = time.perf_counter()
        with decoding(module, gather, engine) as m, torch.no_grad():
            sync()
            enter = time.perf_counter() - t0
            m(ids)  # warm-up (layerwise: records the decoding trace)
            sync()
            t1 = time.perf_counter()
            for _ in range(reps):
                m(ids)
            sync()
            ms = (time.perf_counter() - t1) / reps * 1e3
        times[gather, batch] = ms
        print(f"  {gather:9s} batch {batch:3d}: {ms:8.1f} ms per forward "
              f"(entering the block: {enter * 1e3:.0f} ms)", flush=True)
for batch in batches:
    print(f"  batch {batch}: layerwise / whole = "
          f"{times['layerwise', batch] / times['whole', batch]:.2f}")
PY
}

section_plan() {  # (g)
  local tmp
  tmp=$(mktemp -d)
  "$PYTHON" - "$SCALE_SIZE" "$tmp" <<'PY'
import os, re, subprocess, sys
import torch

smoke, tmp = sys.argv[1] == "tiny", sys.argv[2]
width = (["model.hidden_size=128", "model.num_hidden_layers=2", "model.vocab_size=4096"]
         if smoke else
         ["model.hidden_size=2048", "model.intermediate_size=5120",
          "model.moe_intermediate_size=512", "model.num_hidden_layers=4",
          "model.num_attention_heads=16", "model.num_key_value_heads=4", "model.head_dim=128",
          "model.num_experts=64", "model.num_experts_per_tok=8", "model.n_group=8",
          "model.topk_group=4", "model.vocab_size=157184"])
run = ["+recipe=tiny", *width, "deepspeed=zero3", "micro_batch_size=4", "global_batch_size=4",
       f"data.max_length={64 if smoke else 1024}", "activation_checkpointing=true",
       f"precision={'fp32' if smoke else 'bf16'}"]
cpu = torch.cuda.device_count() == 0
plan = subprocess.run(
    [sys.executable, "-m", "llada_train.memory_plan", "cpt", *run, "plan.num_gpus=1",
     "plan.gpu_gb=80"], capture_output=True, text=True)
print(plan.stdout[-2500:], plan.stderr[-1500:] if plan.returncode else "", flush=True)
peak = re.search(r"memory plan: peak ([0-9.]+) GB", plan.stdout)
train = subprocess.run(
    [sys.executable, "-m", "llada_train.cpt", *run, "max_steps=3", f"output_dir={tmp}/run",
     "checkpoint.save_every=100", "checkpoint.smoke_prompts=0", "checkpoint.export_hf=false",
     "tracking=disabled", "progress=false"], capture_output=True, text=True)
if train.returncode or not peak:
    print(train.stdout[-2000:], train.stderr[-3000:])
    sys.exit(1)
from llada_train.tracking import read_metrics

metrics = read_metrics(f"{tmp}/run")
losses = [round(m["loss/total"], 4) for m in metrics if "loss/total" in m]
gib = max((m.get("memory/peak_gpu_gib_rank0", 0) for m in metrics), default=0)
planned = float(peak.group(1)) - 3.0  # max_memory_allocated sees no context / NCCL / slack
print(f"plan vs measured: losses {losses}; planned {planned:.2f} GB (peak less the 3 GB "
      f"runtime guess)", end="")
if cpu:
    print("; measured: n/a on the CPU")
else:
    print(f", measured {gib * 2**30 / 1e9:.2f} GB (max_memory_allocated), "
          f"plan / measured = {planned / (gib * 2**30 / 1e9):.2f}")
PY
  local rc=$?
  rm -rf "$tmp"
  return $rc
}

section_ep() {  # (h)
  "$PYTHON" - "$SCALE_SIZE" <<'PY'
import copy, sys
import torch
sys.path.insert(0, "tests")
import test_autoep as t  # noqa: E402  (small_config, LAYER_CASES)
from deepspeed.module_inject.auto_ep import AutoEP
from deepspeed.module_inject.auto_ep_config import parse_autoep_config
from llada_train.distributed import adapt_autoep_layers, autoep_block, prepare_for_autoep
from llada_train.model.modeling import LLaDA2MoeModelLM

smoke = sys.argv[1] == "tiny"
device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
print(f"EP parity, 1 process on {device} ({torch.cuda.device_count()} CUDA devices; the "
      "2-process EP=2 test of tests/test_autoep.py runs on CPU processes only)", flush=True)
width = {} if smoke else dict(  # one MoE layer at mini width
    hidden_size=2048, moe_intermediate_size=512, num_experts=256, num_experts_per_tok=8,
    n_group=8, topk_group=4, num_hidden_layers=2, num_attention_heads=16, head_dim=128)
failed = False
for case, extra in t.LAYER_CASES.items():
    for dtype in (torch.float32, torch.bfloat16):
        config = t.small_config(**{**width, **extra})
        torch.manual_seed(0)
        ours = LLaDA2MoeModelLM(config)
        with torch.no_grad():
            for moe in ours.moe_layers():
                moe.gate.expert_bias.copy_(0.05 * torch.randn(config.num_experts))
        wrapped = copy.deepcopy(ours)
        biases = prepare_for_autoep(wrapped)  # create_engine's path, with the device's block
        auto_ep = AutoEP(wrapped, parse_autoep_config(
            {**autoep_block(config, device.type), "autoep_size": 1}))
        auto_ep.replace_moe_layers(auto_ep.ep_parser(), ep_size=1, ep_rank=0)
        adapt_autoep_layers(wrapped, biases)
        moe = ours.moe_layers()[0].to(device, dtype)
        ep = wrapped.moe_layers()[0].to(device, dtype)
        x = torch.randn(4, 64 if smoke else 512, config.hidden_size, device=device, dtype=dtype)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = moe(xa), ep(xb)
        g = torch.randn_like(ya)
        (ya * g).sum().backward()
        (yb * g).sum().backward()
        def rel(a, b):
            a, b = a.detach().float(), b.detach().float()
            return float((a - b).norm() / b.norm())
        out, grad = rel(yb, ya), rel(xb.grad, xa.grad)
        load = bool(torch.equal(ep.last_expert_load.long().cpu(), moe.last_expert_load.cpu()))
        bad = dtype == torch.float32 and (out > 1e-4 or grad > 1e-4 or not load)
        failed |= bad
        print(f"  {case:24s} {str(dtype)[6:]:8s}: output rel err {out:.2e}, input-grad rel err "
              f"{grad:.2e}, expert loads equal {load}{'  FAIL' if bad else ''}", flush=True)
sys.exit(1 if failed else 0)
PY
}

if [ $SCALE_ONLY -eq 1 ] || [ ${#SMOKE[@]} -eq 0 ]; then
  SCALE_SIZE=$([ ${#SMOKE[@]} -gt 0 ] && echo tiny || echo mini)
  export PYTHON OUT SCALE_SIZE
  echo "== (f) layerwise rollout"
  run_section layerwise 150 section_layerwise
  echo "== (g) memory plan vs measured peak"
  run_section plan 180 section_plan
  echo "== (h) EP parity"
  run_section ep 180 section_ep
fi
echo "== done in $(( $(date +%s) - start )) s: tests rc $tests_rc, figures rc $check_rc," \
  "scale rc $scale_rc; $OUT/gpu_check.md"
[ $tests_rc -eq 0 ] && [ $check_rc -eq 0 ] && [ $scale_rc -eq 0 ]
