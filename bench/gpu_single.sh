#!/usr/bin/env bash
# One-GPU benchmark: the Triton kernel tests compiled on the GPU, the quantized linears against bf16
# F.linear and the copy bandwidth, and decode of a GPTQ-int4 g128 Llama-2-7B-shaped checkpoint (random
# weights, ~4 GB written to CKPT_DIR, default /tmp/qshard-llama-2-7b-gptq) against the bandwidth floor.
# Run it from the repository root on a machine with one CUDA GPU and qshard installed on a CUDA torch
# (README, "GPUs"):   DEADLINE=1500 bash bench/gpu_single.sh      (all steps: about 10 min)
# Results go to OUT (default bench/results/gpu-YYYY-MM-DD/): log.txt (every step's output and tables),
# kernel-tests.xml, kernels-*.json, graphs/ and eager/throughput.json, decode-floor.json (the decode
# step: decode-kernels.json, decode-*/throughput.json).
# Settings (environment variables):
#   STEPS          steps to run, in this order (default "tests kernels engine"; "sweep": every tuner candidate
#                  on SWEEP_LAYERS x SWEEP_M; "decode" adds the decode
#                  step with and without the fused kernels: DECODE_BATCHES, KERNEL_PATHS, DECODE_QUANTS)
#   TESTS, JOBS    the tests step's pytest selection (tests/kernels); compile processes and pytest-xdist
#                  workers (14; xdist is used when installed or its wheels are in build/whl)
#   MODELS, MAIN_FORMAT, MORE_FORMATS   kernel shapes and formats (llama-2-7b; gptq4; gptq4-act awq4 int8 fp8)
#   KERNEL_MS      the kernel steps' batch rows (1 2 4 ... 256); MORE_MS, MORE_MODELS: the same for MORE_FORMATS
#   GRAPH_BATCHES  decode batch sizes (1,2,4,...,64); ENGINE_DEBUG=1 adds an in-process run with tracebacks
#   DEADLINE       seconds after which steps are skipped (575: one part per 10-min run); PY (python3)
#   TINY=1         the same steps at toy sizes on CPU (Triton's interpreter), to check the script
# Before each bench, bench/triton_warmup.py compiles every tuner candidate in JOBS processes (one cold
# process would spend minutes compiling).
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-bench/results/gpu-$(date +%Y-%m-%d)}
PY=${PY:-python3}
TINY=${TINY:-0}
STEPS=${STEPS:-tests kernels engine}
MODELS=${MODELS:-llama-2-7b}                      # kernel bench shape sets
MAIN_FORMAT=${MAIN_FORMAT:-gptq4}                 # the issue's format: benched first, on its own
MORE_FORMATS=${MORE_FORMATS-gptq4-act awq4 int8 fp8}
JOBS=${JOBS:-14}                                  # compile processes (and pytest-xdist workers)
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
log="$OUT/log.txt"
step() { echo "== $* ($(date +%T))" | tee -a "$log"; "$@" 2>&1 | tee -a "$log"; echo "-- rc=$? ($(date +%T))" | tee -a "$log"; }
want() { [[ " $STEPS " == *" $1 "* ]]; }
DEADLINE=${DEADLINE:-575}  # seconds this script may run (the device call's limit is 600)
tstep() {  # tstep MAX cmd...: step under a timeout of MAX s, or less where the deadline is nearer
  local t=$(( DEADLINE - SECONDS - 5 )); [ "$1" -lt "$t" ] && t=$1; shift
  if [ "$t" -lt 20 ]; then echo "== skipped (deadline): $*" | tee -a "$log"; return 1; fi
  step timeout "$t" "$@"
}
export QSHARD_TRITON_CACHE="$OUT/triton-tuned.json"  # tuned configs, shared by the bench and engine processes

if [ "$TINY" = 1 ]; then
  shape=tiny; device=cpu; batches=1,4; lens="--input-len 8 --output-len 8"
  kernel_args=(--device cpu --models square-2048 --m 1 --min-time 0.05 --no-dequant-baseline)
  MAIN_FORMAT=gptq4 MORE_FORMATS=int8 ms=(1)
  tests=(tests/kernels/test_triton_kernels.py -k "interpret and gptq4" -x)
else
  shape=llama-2-7b; device=cuda; batches=1,2,4,8,16,32,64; lens="--input-len 128 --output-len 128"
  kernel_args=(--device cuda --models $MODELS)
  ms=(${KERNEL_MS:-1 2 4 8 16 32 64 128 256})
  tests=(${TESTS:-tests/kernels})  # e.g. TESTS="tests/kernels --ignore=tests/kernels/test_cpu_amx.py"
  step nvidia-smi
fi
step $PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.cuda.is_available() and torch.cuda.get_device_name())"
if [ -d build/whl ] && ls build/whl/*.whl >/dev/null 2>&1; then  # carried wheels (pytest-xdist, execnet)
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site build/whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
warm() { [ "$TINY" = 1 ] || tstep 200 $PY bench/triton_warmup.py --jobs "$JOBS" "$@"; }

# 1. kernel tests, compiled on the GPU (the interpreter only where there is none)
if want tests; then
  xdist=()
  [ "$TINY" = 1 ] || ! $PY -c "import xdist" 2>/dev/null || xdist=(-n "$JOBS")
  QSHARD_TRITON_CACHE= tstep 300 $PY -m pytest -q -p no:cacheprovider "${xdist[@]}" "${tests[@]}" \
    --junitxml "$OUT/kernel-tests.xml"
fi

# 2. the kernels against the copy bandwidth and bf16 F.linear, measured in the same run
if want kernels; then
  warm --models $MODELS --formats $MAIN_FORMAT --m "${ms[@]}"
  tstep 240 $PY -m launch.cli bench kernels "${kernel_args[@]}" --formats $MAIN_FORMAT --m "${ms[@]}" \
    --json "$OUT/kernels-bf16-$MAIN_FORMAT.json"
  if [ -n "$MORE_FORMATS" ]; then
    more_ms=(${MORE_MS:-${ms[@]}}); more_models=${MORE_MODELS:-$MODELS}
    [ "$TINY" = 1 ] && more_ms=(1)
    warm --models $more_models --formats $MORE_FORMATS --m "${more_ms[@]}"
    tstep 300 $PY -m launch.cli bench kernels "${kernel_args[@]}" --models $more_models --formats $MORE_FORMATS --m "${more_ms[@]}" \
      --json "$OUT/kernels-bf16-more.json"
  fi
fi

# 3. the engine: a random GPTQ-int4-g128 checkpoint of Llama-2-7B's shape, written to disk, then decode
if want engine; then
  # fp16 (the engine's dtype) kernel bench; its tuning (+ M=512, prefill) is what the engine then reuses
  warm --models $shape --formats gptq4 --dtype fp16 --m "${ms[@]}" 512
  engine_ms=("${ms[@]}"); [ "$TINY" = 1 ] || engine_ms+=(512)
  tstep 240 $PY -m launch.cli bench kernels "${kernel_args[@]}" $([ "$TINY" = 1 ] || echo --models $shape) \
    --formats gptq4 --dtype fp16 --m "${engine_ms[@]}" --json "$OUT/kernels-fp16-gptq4.json"
  ckpt=${CKPT_DIR:-/tmp/qshard-$shape-gptq}
  [ -f "$ckpt/config.json" ] || tstep 240 $PY -m launch.cli write-random --shape $shape --quant gptq-w4g128 -o "$ckpt"
  # STRIP_G_IDX=1: drop the g_idx tensors (desc_act=false checkpoints may omit them). Needed before
  # quant/gptq.py compared g_idx on the tensor's own device (fixed 2026-11-23).
  [ "${STRIP_G_IDX:-0}" = 1 ] && step $PY - "$ckpt" <<'PYEOF'
import json, sys
from pathlib import Path
from safetensors import safe_open
from safetensors.torch import load_file, save_file
d = Path(sys.argv[1])
for f in sorted(d.glob("*.safetensors")):
    with safe_open(str(f), "pt") as h:
        if not any(k.endswith(".g_idx") for k in h.keys()):
            continue
    tensors = load_file(str(f))
    save_file({k: v for k, v in tensors.items() if not k.endswith(".g_idx")}, str(f), metadata={"format": "pt"})
    print(f"{f.name}: dropped {sum(k.endswith('.g_idx') for k in tensors)} g_idx tensors")
idx = d / "model.safetensors.index.json"
if idx.exists():
    j = json.loads(idx.read_text())
    j["weight_map"] = {k: v for k, v in j["weight_map"].items() if not k.endswith(".g_idx")}
    idx.write_text(json.dumps(j, indent=2))
PYEOF
  tstep 300 $PY -m launch.cli bench throughput --model "$ckpt" --tp 1 --batch ${GRAPH_BATCHES:-$batches} $lens \
    --dtype float16 --device $device --hf off --out "$OUT/graphs"
  if [ "${ENGINE_DEBUG:-0}" = 1 ]; then  # in this process: the whole traceback (the bench keeps 25 lines)
    CUDA_LAUNCH_BLOCKING=1 tstep 200 $PY -m launch.bench_throughput --log-level INFO --model "$ckpt" --tp 1 \
      --batch $batches $lens --dtype float16 --device $device --measure "$OUT/debug-measure.json"
  fi
  tstep 200 $PY -m launch.cli bench throughput --model "$ckpt" --tp 1 --batch 1 $lens --dtype float16 \
    --device $device --hf off --eager --out "$OUT/eager"
  tstep 60 $PY bench/decode_floor.py --model "$ckpt" --device $device --json "$OUT/decode-floor.json" \
    --throughput "$OUT/graphs/throughput.json" "$OUT/eager/throughput.json"
  rm -f "$OUT"/*/throughput.png "$OUT"/*/throughput.md  # 8 files come back at most; the tables are in the log
fi
# 4. the decode step, before/after the fused non-matmul kernels (engine option kernels): per-kernel
#    times in graphs (bench/decode_kernels.py), then Llama-2-7B-shaped random weights made in place
#    (GPTQ-int4 g128 and fp16), in-process (executor uni: the step breakdown needs the worker), both
#    kernel paths (KERNEL_PATHS, default torch,auto) in the same run. DECODE_BATCHES (1,16,64),
#    DECODE_QUANTS (gptq-w4g128 none), KERNEL_BENCH=0 skips the per-kernel times.
if want decode; then
  decode_batches=${DECODE_BATCHES:-1,16,64}
  paths=${KERNEL_PATHS:-torch,auto}
  [ "$TINY" = 1 ] && { decode_batches=1,2; paths=${KERNEL_PATHS:-torch,triton}; export TRITON_INTERPRET=1; }
  [ "$TINY" = 1 ] || [ "${KERNEL_BENCH:-1}" = 0 ] || tstep 120 $PY bench/decode_kernels.py --shape $shape --batch ${decode_batches//,/ } \
    --json "$OUT/decode-kernels.json"
  warm --models $shape --formats gptq4 --dtype fp16 --m 1 2 4 8 16 32 64 128 256 512
  for quant in ${DECODE_QUANTS:-gptq-w4g128 none}; do
    tstep 280 $PY -m launch.cli bench throughput --shape $shape --quant $quant --executor uni --kernels $paths \
      --tp 1 --batch $decode_batches $lens --dtype float16 --device $device --hf off --out "$OUT/decode-$quant"
  done
  rm -rf "$OUT"/decode-*/model-* "$OUT"/decode-*/throughput.png "$OUT"/decode-*/throughput.md  # 8 files come back
fi
# 5. every tuner candidate timed on the layers and M of SWEEP_LAYERS / SWEEP_M (bf16, SWEEP_FORMATS):
#    the A/B of kernel variants (e.g. the lop3 unpack against the arithmetic one) from one run
if want sweep; then
  warm --models $MODELS --formats ${SWEEP_FORMATS:-gptq4} --m ${SWEEP_M:-1 16}
  tstep 240 $PY -m launch.cli bench kernels "${kernel_args[@]}" --formats ${SWEEP_FORMATS:-gptq4} \
    --layers ${SWEEP_LAYERS:-qkv gate_up} --m ${SWEEP_M:-1 16} --sweep --no-dequant-baseline --json "$OUT/kernels-sweep.json"
fi
echo "results in $OUT" | tee -a "$log"
