#!/usr/bin/env bash
# The GPU path, end to end, on one CUDA box: what we run when a GPU machine is lent.
#
#   bash tools/gpu_smoke.sh OUT_DIR MODEL [STEPS] [REWARD]
#
#   1. rlengine's training loop on CUDA through the deepspeed launcher: ZeRO-3 (bf16, DeepSpeed's
#      fused AdamW, grad clipping), a frozen ZeRO-3 reference model for KL, the colocated HF sampler
#      on the GPU, a weight push + probe after every step, a checkpoint every 2 steps;
#   2. a second launch that resumes from the first run's last checkpoint and trains to STEPS + 2
#      (DeepSpeed's ZeRO-3 checkpoint restored on the GPU);
#   3. tools/bench_weight_sync.py: gloo (CPU tensors) at 1 and 4 threads per rank, and NCCL
#      (which needs two GPUs: on one it records NCCL's refusal).
#
# MODEL is a model directory (or "embedded"); REWARD defaults to the default config's reward.
# Stage time limits in seconds: TRAIN_TIMEOUT (900), RESUME_TIMEOUT (600), BENCH_TIMEOUT (300).
# Writes OUT_DIR/{env.txt,train.log,resume.log,metrics.jsonl,summary.json,bench_*.log}.
set -u
OUT=${1:?OUT_DIR}
MODEL=${2:?MODEL}
STEPS=${3:-6}
REWARD=${4:-}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
RUN=${GPU_SMOKE_RUN_DIR:-/tmp/rlengine-gpu-smoke}
rm -rf "$RUN"

{
  nvidia-smi -L
  python3 -c "import torch, deepspeed, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'nccl', torch.cuda.nccl.version(), '|', torch.cuda.get_device_name(0), '| deepspeed', deepspeed.__version__, \
'| transformers', transformers.__version__)"
} 2>&1 | tee "$OUT/env.txt"

common=(--config configs/default.yaml "model.path=$MODEL" "run.output_dir=$RUN" run.save_every=2
        run.keep_last=2 run.token_dump_every=2 train.kl_coef=0.01 reward.num_workers=2)
[ -n "$REWARD" ] && common+=("reward.name=$REWARD")

echo "== train: $STEPS steps"
timeout ${TRAIN_TIMEOUT:-900} python3 -m rlengine train --nproc 1 "${common[@]}" "run.total_steps=$STEPS" 2>&1 | tee "$OUT/train.log"
echo "train exit: ${PIPESTATUS[0]}"
echo "== resume to $((STEPS + 2)) steps from the last checkpoint"
timeout ${RESUME_TIMEOUT:-600} python3 -m rlengine train --nproc 1 "${common[@]}" "run.total_steps=$((STEPS + 2))" 2>&1 | tee "$OUT/resume.log"
echo "resume exit: ${PIPESTATUS[0]}"
cp "$RUN/metrics.jsonl" "$OUT/metrics.jsonl" 2>/dev/null

python3 - "$RUN/metrics.jsonl" "$OUT/summary.json" <<'EOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
keys = ["step", "reward/mean", "loss", "grad_norm", "kl_ref", "entropy", "sync/checksum_ok", "sync/probe_abs_diff",
        "sync/seconds", "sync/gbps", "time/rollout", "time/train", "time/sync", "time/step", "mem/gpu_peak_gb"]
table = [{k: r.get(k) for k in keys if k in r} for r in rows]
for t in table:
    print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in t.items()))
json.dump(table, open(sys.argv[2], "w"), indent=1)
EOF

for threads in 1 4; do
  echo "== bench_weight_sync gloo, $threads threads/rank"
  timeout ${BENCH_TIMEOUT:-300} python3 tools/bench_weight_sync.py --model "$MODEL" --bucket-mb 16 --repeats 5 --threads $threads \
    2>&1 | tee "$OUT/bench_gloo_t$threads.log" | tail -2
done
echo "== bench_weight_sync nccl"
timeout ${BENCH_TIMEOUT:-300} python3 tools/bench_weight_sync.py --model "$MODEL" --bucket-mb 64 --repeats 5 --backend nccl \
  2>&1 | tee "$OUT/bench_nccl.log" | tail -25
exit 0
