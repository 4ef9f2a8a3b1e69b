#!/usr/bin/env bash
# The whole GPU check in one run, for a GPU host with torch, triton and transformers only:
# the CUDA tests, the GPU benchmarks (each against its peer in the same run) and a decode-step
# profile. About 5 minutes on an H200. Usage: bash scripts/gpu_check.sh [quick]
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD
bench="python3 -m kvserve.bench.standalone"
big=$([ "${1:-}" = quick ] && echo llama-1b || echo llama-8b)
# each step under its own time limit, so that one hang does not spend the device call
step() { echo; echo "=== $*"; timeout "${STEP_TIMEOUT:-240}" "$@" || echo "=== FAILED ($?): $*"; }
# on the device tool, the whole log comes back as a file (its reply keeps only the output's tail)
[ -n "${OUT:-}" ] && exec > >(tee -a "$OUT/gpu_check.log") 2>&1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
step python3 -m pytest -q -p no:cacheprovider tests/attention/test_triton.py tests/attention/test_static_decode.py \
    tests/engine/test_static_executor.py tests/engine/test_static_groups.py tests/engine/test_overlap.py \
    -k "cuda or static_decode_matches"
step python3 -m pytest -q -p no:cacheprovider tests/model/test_moe_triton.py tests/model/test_pointwise_triton.py  # on CUDA there
# every family through the engine on CUDA (Triton attention, CUDA graphs over KV groups) against
# transformers, and TP=1 over NCCL against one process (issues 25 and 26)
step python3 -m pytest -q -p no:cacheprovider tests/model/test_families_engine.py \
    tests/distributed/test_tensor_parallel.py -k "cuda or one_rank_under_torchrun"
step $bench attention --device cuda
# overlapped steps (on by default on a GPU) against synchronous ones
step $bench latency --device cuda --random-weights llama-1b --prompt-len 128 --output-len 128 --no-overlap-schedule
for shape in llama-1b $big; do
    step $bench latency --device cuda --random-weights $shape --prompt-len 128 --output-len 128
    step $bench throughput --device cuda --random-weights $shape --num-prompts 256 --input-len 128 --output-len 128 \
        --max-num-seqs 256 --max-num-batched-tokens 8192 --peer-batch-size 64
done
step $bench profile --device cuda --random-weights llama-1b --batch 256 --steps 8
# NanoFlow's nano-batching, measured before it is built: a batch-256 decode step whole vs in two halves on two streams
step $bench nanobatch --device cuda --random-weights $big --batch 256 --input-len 512 --max-num-batched-tokens 8192
# long context (~60 s): every attention policy on the GPU against the CPU, MagicPIG's CPU-GPU split,
# and each policy's decode step at 8k on a 1B shape (the split's time by part)
step python3 -m pytest -q -p no:cacheprovider tests/attention/test_policy_devices.py tests/engine/test_offload.py -k cuda
step $bench longctx --device cuda --random-weights llama-1b --lengths 8192 --steps 8 \
    --policies full streaming magicpig topk magicpig:offload=true
step $bench overhead
