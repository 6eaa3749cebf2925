#!/usr/bin/env bash
# Every 2-GPU check and benchmark of Lighthouse's multi-GPU support, in about 9 minutes:
#   context parallelism (CP=2) equals one GPU (a layer, a small Llama, the Llama under FSDP2);
#   Trainer with CP + FSDP2, DDP and FSDP2 (recovery switch, checkpoints, resume, export);
#   tokens/s and peak memory per GPU at 128K and 256K, one GPU vs CP=2, and the longest sequence.
# Each step runs under its own time limit, so one failure does not eat the rest.
# Output under $OUT (default /tmp/lighthouse-2gpu): summary.txt, results.json, logs/<step>.log.
#   bash examples/distributed/run_2gpu.sh
set -o pipefail
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
cd "$(dirname "$0")/../.." || exit 1
OUT=${OUT:-/tmp/lighthouse-2gpu}
WORK=$(mktemp -d /tmp/lighthouse-2gpu-work.XXXX)  # checkpoints and per-rank reports stay out of $OUT
BUDGET=${BUDGET:-525}
START=$(date +%s)
mkdir -p "$OUT/logs"

# The package from this tree (setup.cfg maps patches/ to lighthouse_hf.patches, so it must be installed).
python3 -m pip install -q --no-deps --no-build-isolation -e . >"$WORK/install.log" 2>&1 || { cat "$WORK/install.log"; exit 1; }

{
  echo "start $(date -u +%FT%TZ)"
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
  python3 -c "import sys, torch, transformers, accelerate, lighthouse_hf; print(sys.version.split()[0], torch.__version__, transformers.__version__, accelerate.__version__, lighthouse_hf.__file__)"
} 2>&1 | tee "$OUT/summary.txt"

step() {  # step NAME LIMIT_S COMMAND...: run COMMAND under min(LIMIT_S, what is left of BUDGET)
  local name=$1 limit=$2 left rc began
  shift 2
  left=$((BUDGET - ($(date +%s) - START) - 15))
  ((limit > left)) && limit=$left
  if ((limit < 30)); then
    echo "$name: SKIPPED (time budget)" | tee -a "$OUT/summary.txt"
    return
  fi
  began=$(date +%s)
  timeout -k 10 "$limit" "$@" >"$OUT/logs/$name.log" 2>&1
  rc=$?
  echo "$name: rc=$rc in $(($(date +%s) - began)) s (limit $limit s)" | tee -a "$OUT/summary.txt"
  grep -E "PASSED|FAILED|Traceback|Error" "$OUT/logs/$name.log" | grep -v Warning | tail -n 4 | tee -a "$OUT/summary.txt"
}

RUN2=(python3 -m torch.distributed.run --standalone --nproc-per-node 2)
D=examples/distributed
step equality 95 "${RUN2[@]}" $D/equality_check.py --out "$WORK/equality"
step trainer_cp 75 "${RUN2[@]}" $D/trainer_check.py --mode cp --out "$WORK/trainer_cp"
step trainer_ddp 55 "${RUN2[@]}" $D/trainer_check.py --mode ddp --out "$WORK/trainer_ddp"
step trainer_fsdp2 55 "${RUN2[@]}" $D/trainer_check.py --mode fsdp2 --out "$WORK/trainer_fsdp2"
step bench_1gpu 120 python3 -m torch.distributed.run --standalone --nproc-per-node 1 $D/bench_cp.py --out "$WORK/bench" --search
step bench_cp2 120 "${RUN2[@]}" $D/bench_cp.py --out "$WORK/bench" --search

python3 $D/summarize.py "$WORK" "$OUT/results.json" 2>&1 | tee -a "$OUT/summary.txt"
echo "total $(($(date +%s) - START)) s" | tee -a "$OUT/summary.txt"
