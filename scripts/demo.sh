#!/usr/bin/env bash
# The default tiny job, on CPU, on the shipped data (nothing is downloaded):
#   CPT of a fresh tiny LLaDA2-MoE -> SFT from the CPT checkpoint -> a question through the
#   shared sampler. Runs land in runs/demo/ (RUNS=... to change); a second run resumes or skips
#   finished stages (resume=auto).
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-runs/demo}
export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu} WANDB_MODE=${WANDB_MODE:-offline}

echo "== 1/3 continued pre-training (tiny, shipped corpus)"
python -m llada_train.cpt +recipe=tiny output_dir="$RUNS/cpt" "$@"

echo "== 2/3 SFT from the CPT checkpoint (M2T + T2T corruption)"
CPT_HF=$(python -c "from llada_train.checkpoint import resolve_model_dir as r; print(r('$RUNS/cpt'))")
python -m llada_train.sft +recipe=tiny init_from="$CPT_HF" output_dir="$RUNS/sft" "$@"

echo "== 3/3 a question to the SFT model through the shared sampler"
SFT_HF=$(python -c "from llada_train.checkpoint import resolve_model_dir as r; print(r('$RUNS/sft'))")
for mode in quality speed; do
  echo "-- sampler=$mode"
  python -m llada_train.generate model_dir="$SFT_HF" sampler=$mode prompt="What is 123 + 456?"
done
