#!/usr/bin/env bash
# The accelerator check, on one GPU or TPU host, in under 8 minutes on one H100/H200:
#   1. correctness: ragged_dot dropless == capacity path with ample capacity; expert
#      parallelism over all local devices == one device, padded and ragged exchange
#      (skipped on one device); the ragged exchange on the backend's ragged_all_to_all
#      == its all_to_all reference == local experts (runs on one device too);
#   2. the train step of the nomic_v2_moe preset at sequence 512 in bfloat16: tokens/s
#      and MFU against the bf16 matmul peak measured in the same process;
#   3. one MoE block (nomic width): the dropless kernel (ragged_dot) against the
#      capacity path and a dense MLP of equal active FLOPs.
# Results: OUT_DIR/check.json (stages 1-2) and OUT_DIR/moe_layer.json (stage 3).
#
#   bash benchmarks/accelerator_check.sh [OUT_DIR]
#   CPU_SMOKE=1 bash benchmarks/accelerator_check.sh [OUT_DIR]   # dry run, tiny sizes, CPU
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-/tmp/accelerator_check}"
mkdir -p "$out"
status=0

if [[ "${CPU_SMOKE:-0}" == "1" ]]; then
  export JAX_PLATFORMS=cpu
  export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=4"
  python benchmarks/accelerator_check.py --cpu_smoke --json="$out/check.json" || status=$?
  python benchmarks/moe_layer.py --widths=tiny --tokens=1024 --paths=dropless,capacity \
    --repeats=1 --json="$out/moe_layer.json" || status=$?
else
  python -c "import jax; print(jax.devices())"
  # Stages 1-2: about 5 minutes (the batch search compiles the 12-layer step three times).
  timeout 330 python benchmarks/accelerator_check.py --json="$out/check.json" || status=$?
  # Stage 3: the MoE block alone, bfloat16, the backend's dropless kernel vs capacity 1.25.
  timeout 120 python benchmarks/moe_layer.py --widths=nomic_v2_moe --tokens=16384,65536 \
    --paths=dropless,capacity --dtype=bfloat16 --repeats=10 --max_gb=60 \
    --json="$out/moe_layer.json" || status=$?
fi
echo "accelerator check: exit status $status; results in $out"
exit "$status"
