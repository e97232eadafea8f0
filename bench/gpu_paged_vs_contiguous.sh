#!/usr/bin/env bash
# One GPU: the decode step of this tree (paged KV cache, async scheduling on and off) against an
# earlier tree with the contiguous per-sequence cache (OLD_TREE, e.g. `git archive e4b49fa^` unpacked
# into .old), in the same run: Llama-2-7B shape, random weights made in place, GPTQ-int4 g128 and
# fp16, batches DECODE_BATCHES, 128 in / 128 out, CUDA graphs, kernels=auto, executor uni.
#   OLD_TREE=.old OUT=bench/results/gpu-DATE/paged bash bench/gpu_paged_vs_contiguous.sh
# Results: OUT/log.txt (every table), OUT/new-<quant>.json and OUT/old-<quant>.json (throughput.json).
set -uo pipefail
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-bench/results/gpu-$(date +%Y-%m-%d)/paged}
PY=${PY:-python3}
OLD_TREE=${OLD_TREE:-}
BATCHES=${DECODE_BATCHES:-1,16,64}
QUANTS=${DECODE_QUANTS:-gptq-w4g128 none}
DEADLINE=${DEADLINE:-575}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
log="$OUT/log.txt"
step() { echo "== $* ($(date +%T))" | tee -a "$log"; "$@" 2>&1 | tee -a "$log"; echo "-- rc=$? ($(date +%T))" | tee -a "$log"; }
tstep() {
  local t=$(( DEADLINE - SECONDS - 5 )); [ "$1" -lt "$t" ] && t=$1; shift
  if [ "$t" -lt 20 ]; then echo "== skipped (deadline): $*" | tee -a "$log"; return 1; fi
  step timeout "$t" "$@"
}
args=(--shape llama-2-7b --executor uni --kernels auto --tp 1 --batch "$BATCHES" --input-len 128 --output-len 128
      --dtype float16 --device cuda --hf off)
here=$PWD
for quant in $QUANTS; do
  QSHARD_TRITON_CACHE="$OUT/tuned-new.json" PYTHONPATH="$here" tstep 200 $PY -m launch.cli bench throughput \
    "${args[@]}" --quant "$quant" --async-scheduling on,off --out "$OUT/new-$quant"
  cp "$OUT/new-$quant/throughput.json" "$OUT/new-$quant.json" 2>/dev/null
  if [ -n "$OLD_TREE" ]; then
    (cd "$OLD_TREE" && QSHARD_TRITON_CACHE="$OUT/tuned-old.json" PYTHONPATH="$PWD" tstep 150 $PY -m launch.cli \
      bench throughput "${args[@]}" --quant "$quant" --out "$OUT/old-$quant")
    cp "$OUT/old-$quant/throughput.json" "$OUT/old-$quant.json" 2>/dev/null
  fi
  rm -rf "$OUT/new-$quant" "$OUT/old-$quant"  # 8 files come back at most: the JSON and the log hold it all
done
rm -f "$OUT"/tuned-*.json
echo "results in $OUT" | tee -a "$log"
