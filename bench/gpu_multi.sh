#!/usr/bin/env bash
# Multi-GPU benchmark: all-reduce latency and bus bandwidth (NCCL) at TP 2 and GPUS, equal greedy tokens
# at every TP size through the mp and torchrun executors, and decode throughput scaling of GPTQ-int4 g128
# checkpoints of Llama-2-7B and -70B shape (random weights, made in place) at TP 1, 2 and GPUS.
# Run it from the repository root on one host with several CUDA GPUs and qshard installed on a CUDA torch
# (README, "GPUs"):   bash bench/gpu_multi.sh      (GPUS=2 on a two-GPU host)
# Results go to OUT (default bench/results/gpu-multi-YYYY-MM-DD/): log.txt (every step's output),
# allreduce-tp*.json, equal-mp/, equal-torchrun/, scaling-*/throughput.json.
# Settings: GPUS (4), OUT, PY (python3); TINY=1 runs the same steps at toy sizes on CPU over gloo, to
# check the script. The ray executor is not run here (tests/launch covers it). NVLink multicast stays
# off in every process (it can take a shared host's GPUs out of service).
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# NVLink multicast stays off in every process (it can take the host's shared GPUs out of service)
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-bench/results/gpu-multi-$(date +%Y-%m-%d)}
PY=${PY:-python3}
TINY=${TINY:-0}
GPUS=${GPUS:-4}
mkdir -p "$OUT"
log="$OUT/log.txt"
step() { echo "== $* ($(date +%T))" | tee -a "$log"; "$@" 2>&1 | tee -a "$log"; }
TORCHRUN=($PY -m torch.distributed.run --standalone)

if [ "$TINY" = 1 ]; then
  shapes="tiny"; device=cpu; tps=1,2; batches=1,4; lens="--input-len 8 --output-len 8"; ar_max=$((2 << 20))
else
  shapes="llama-2-7b llama-2-70b"; device=cuda; tps=1,2,$GPUS; batches=1,64; lens="--input-len 128 --output-len 128"
  ar_max=$((64 << 20))
  step nvidia-smi topo -m
fi

# 1. all-reduce latency / bus bandwidth at TP 2 and GPUS
for n in 2 $GPUS; do
  step "${TORCHRUN[@]}" --nproc-per-node $n bench/allreduce.py --max-bytes $ar_max --json "$OUT/allreduce-tp$n.json"
done

# 2. equal greedy tokens at every TP size through mp and torchrun (bench throughput compares digests)
ckpt=/tmp/qshard-equal-gptq
step $PY -m launch.cli write-random --shape ${shapes%% *} --quant gptq-w4g128 --layers 4 -o $ckpt
step $PY -m launch.cli bench throughput --model $ckpt --tp $tps --batch 4 --input-len 16 --output-len 16 \
  --dtype float16 --device $device --hf off --executor mp --out "$OUT/equal-mp"
step $PY -m launch.cli bench throughput --model $ckpt --tp $tps --batch 4 --input-len 16 --output-len 16 \
  --dtype float16 --device $device --hf off --executor torchrun --out "$OUT/equal-torchrun"

# 3. throughput scaling, int4 checkpoints of 7B and 70B shape (random weights made in place)
for shape in $shapes; do
  step $PY -m launch.cli bench throughput --shape $shape --quant gptq-w4g128 --tp $tps --batch $batches $lens \
    --dtype float16 --device $device --hf off --out "$OUT/scaling-$shape"
done
rm -f "$OUT"/*/throughput.png "$OUT"/*/throughput.md  # 8 files come back at most; the tables are in log.txt
echo "results in $OUT" | tee -a "$log"
