#!/usr/bin/env bash
# The checks of issues 5 and 8 that need a GPU, as one prepared command for a lent machine (see the device tool's
# README: 15 minutes of device time per session, a command at most 10 minutes, at most 8 files back).
#
#   bash benchmarks/gpu_checks.sh --prepare          # here, first: the wheels the GPU machine lacks, into .whl/
#   device run: command="bash benchmarks/gpu_checks.sh train overhead", carry=[".whl"], timeout_s=590
#               then, if time is left: command="bash benchmarks/gpu_checks.sh decode fsdp vllm", carry=[".whl"]
#   bash benchmarks/gpu_checks.sh --cpu [STEP ...]   # a dry run of the same steps at tiny scale on a CPU
#
# Steps (all by default, in this order), each under its own time limit so a slow one cannot eat the others':
#   train     issue 5: `promptloop train configs/miniworld_grpo.yaml` on the GPU, weights in bf16, 10 steps;
#             the trainer's on-policy ratio check runs on the first micro-batch (an error stops it); metrics.jsonl
#   overhead  issue 8: SDXL + Qwen2.5-VL-3B shapes (random weights; 1024 px, 50 steps, batch 8, bf16): plain
#             sampling, closed loop and a-priori at N_R = 5, 3, 1 (most wanted first; JSON after every case)
#   decode    issue 8: where the policy's decode time goes, dynamic vs static KV cache (benchmarks/policy_decode.py)
#   fsdp      issue 5: the same training for 3 steps under `accelerate launch` with configs/accelerate/fsdp.yaml
#             on one process
#   vllm      issue 8: the overhead setting with the policy served by vLLM (closed loop and a-priori), then the
#             train step with grpo.rollout_backend vllm; runs only where the GPU machine already has vllm (its
#             239 MB wheel is over the 64 MiB carry limit)
# Results go to $OUT (the device tool's folder; benchmarks/results/gpu_checks/ when OUT is unset): steps.txt (rc
# and seconds per step), log.txt (every step's output), and each step's JSON. Record them in docs/benchmarks.md.
set -u
cd "$(dirname "$0")/.."
WHEELS=(diffusers==0.42.1 transformers==5.24.0 peft==0.21.2 importlib_metadata==8.7.0)

if [ "${1:-}" = "--prepare" ]; then
  mkdir -p .whl
  grep -qx "/.whl/" .git/info/exclude 2>/dev/null || echo "/.whl/" >> .git/info/exclude
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "${WHEELS[@]}" && ls -l .whl
  exit
fi

cpu=0
if [ "${1:-}" = "--cpu" ]; then cpu=1; shift; fi
steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(train overhead decode fsdp vllm)
OUT=${OUT:-benchmarks/results/gpu_checks}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
run_dir=$(mktemp -d)

if [ $cpu -eq 1 ]; then
  PY=${PY:-.venv/bin/python}
  device=cpu; dtype=float32; bench_dtype=fp32; scale=tiny; train_steps=2; tokens=8; refinements=3,1
else
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "wheels missing: run 'bash benchmarks/gpu_checks.sh --prepare' here and carry .whl" >&2; exit 2; }
  export PYTHONPATH=/tmp/site:$PWD
  PY=python3
  device=cuda; dtype=bfloat16; bench_dtype=bf16; scale=full; train_steps=10; tokens=77; refinements=5,3,1
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >> "$OUT/log.txt" 2>&1
fi
"$PY" -c "import torch, transformers, diffusers, peft, accelerate; print('torch', torch.__version__, 'transformers',
transformers.__version__, 'diffusers', diffusers.__version__, 'peft', peft.__version__, 'accelerate',
accelerate.__version__)" >> "$OUT/log.txt" 2>&1

step() {  # step NAME LIMIT_S COMMAND...: run it under its limit, log its output, record rc and seconds
  local name=$1 limit=$2 start rc
  shift 2
  echo "== $name (limit ${limit} s): $*" | tee -a "$OUT/log.txt"
  start=$(date +%s)
  timeout "$limit" "$@" >> "$OUT/log.txt" 2>&1
  rc=$?
  echo "$name rc=$rc $(( $(date +%s) - start )) s" | tee -a "$OUT/steps.txt" "$OUT/log.txt"
}

train_args=(configs/miniworld_grpo.yaml --backbone.dtype "$dtype" --policy.dtype "$dtype"
            --logging.report_to none --logging.image_every 0 --logging.eval_every 0 --logging.progress false)
for s in "${steps[@]}"; do
  case $s in
    train)
      step train 120 "$PY" -m promptloop.cli train "${train_args[@]}" --grpo.max_steps "$train_steps" \
        --logging.checkpoint_every "$train_steps" --logging.output_dir "$run_dir/train"
      cp "$run_dir/train/metrics.jsonl" "$OUT/train_metrics.jsonl" 2>/dev/null ;;
    overhead)
      step overhead 400 "$PY" benchmarks/overhead.py --scale "$scale" --device "$device" --dtype "$bench_dtype" \
        --repeats 1 --refinements "$refinements" --modes plain,closed,apriori --no-split \
        --max-new-tokens "$tokens" --out "$OUT/overhead.json" ;;
    decode)
      step decode 200 "$PY" benchmarks/policy_decode.py --device "$device" --dtype "$bench_dtype" --scale "$scale" \
        --new-tokens "$tokens" --out "$OUT/policy_decode.json" ;;
    fsdp)
      if [ $cpu -eq 1 ]; then echo "fsdp skipped on the CPU (FSDP wants CUDA here)" | tee -a "$OUT/steps.txt"; continue; fi
      step fsdp 150 "$PY" -m accelerate.commands.launch --config_file configs/accelerate/fsdp.yaml --num_processes 1 \
        -m promptloop.cli train "${train_args[@]}" --grpo.max_steps 3 --logging.checkpoint_every 3 \
        --logging.output_dir "$run_dir/fsdp"
      cp "$run_dir/fsdp/metrics.jsonl" "$OUT/fsdp_metrics.jsonl" 2>/dev/null ;;
    vllm)
      if [ $cpu -eq 1 ] || ! "$PY" -c "import vllm" >> "$OUT/log.txt" 2>&1; then
        echo "vllm skipped (needs CUDA and an installed vllm; its wheel is too large to carry)" \
          | tee -a "$OUT/steps.txt"
        continue
      fi
      step vllm 300 "$PY" benchmarks/overhead.py --scale "$scale" --device "$device" --dtype "$bench_dtype" \
        --repeats 1 --refinements "$refinements" --modes closed,apriori --no-split --policy-backend vllm \
        --max-new-tokens "$tokens" --out "$OUT/overhead_vllm.json"
      step vllm_train 150 "$PY" -m promptloop.cli train "${train_args[@]}" --grpo.rollout_backend vllm \
        --grpo.max_steps "$train_steps" --logging.checkpoint_every "$train_steps" --logging.output_dir "$run_dir/vllm"
      cp "$run_dir/vllm/metrics.jsonl" "$OUT/vllm_train_metrics.jsonl" 2>/dev/null ;;
    *) echo "unknown step $s (train, overhead, decode, fsdp, vllm)" >&2; exit 2 ;;
  esac
done
cat "$OUT/steps.txt"
