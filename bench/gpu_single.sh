#!/usr/bin/env bash
# The single-GPU run (issue 8) in one device call:  run(command="bash bench/gpu_single.sh", timeout_s=600)
# Results land in $OUT (the device tool brings them back; commit them under bench/results/).
# TINY=1 runs the same steps at toy sizes on CPU (Triton under TRITON_INTERPRET=1) to check the script.
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-bench/results/gpu-$(date +%Y-%m-%d)}
PY=${PY:-python3}
TINY=${TINY:-0}
mkdir -p "$OUT"
log="$OUT/log.txt"
step() { echo "== $* ($(date +%T))" | tee -a "$log"; "$@" 2>&1 | tee -a "$log"; }

if [ "$TINY" = 1 ]; then
  shape=tiny; device=cpu; batches=1,4; lens="--input-len 8 --output-len 8"
  kernels_args=(--device cpu --models square-2048 --m 1 --formats gptq4 --min-time 0.05 --no-dequant-baseline)
  tests=(tests/kernels/test_triton_kernels.py -k "interpret and gptq4" -x)
else
  shape=llama-2-7b; device=cuda; batches=1,2,4,8,16,32,64; lens="--input-len 128 --output-len 128"
  kernels_args=(--device cuda)
  tests=(tests/kernels)
  step nvidia-smi
fi
step $PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.cuda.is_available() and torch.cuda.get_device_name())"

# 1. kernel tests, compiled on the GPU (the interpreter only where there is none)
step $PY -m pytest -q -p no:cacheprovider "${tests[@]}" --junitxml "$OUT/kernel-tests.xml"

# 2. the kernels against the copy bandwidth and bf16 F.linear, measured in the same run
step $PY -m launch.cli bench kernels "${kernels_args[@]}" --json "$OUT/kernels.json"

# 3. the engine: a random GPTQ-int4-g128 checkpoint of Llama-2-7B's shape, written to disk, then decode
ckpt=${CKPT_DIR:-/tmp/qshard-$shape-gptq}
[ -f "$ckpt/config.json" ] || step $PY -m launch.cli write-random --shape $shape --quant gptq-w4g128 -o "$ckpt"
step $PY -m launch.cli bench throughput --model "$ckpt" --tp 1 --batch $batches $lens --dtype float16 \
  --device $device --hf off --out "$OUT/graphs"
step $PY -m launch.cli bench throughput --model "$ckpt" --tp 1 --batch 1 $lens --dtype float16 \
  --device $device --hf off --eager --out "$OUT/eager"
step $PY bench/decode_floor.py --model "$ckpt" --device $device --json "$OUT/decode-floor.json" \
  --throughput "$OUT/graphs/throughput.json" "$OUT/eager/throughput.json"
rm -f "$OUT"/*/throughput.png  # the device tool brings back 8 files at most: keep the JSON and tables
echo "results in $OUT" | tee -a "$log"
