#!/usr/bin/env bash
# The accelerator check: MAE ViT-B/16 and ViT-L/16 in bfloat16 on one GPU (or TPU chip), about
# 6 minutes: img/s and MFU against the measured bfloat16 matmul peak at three batch sizes each,
# ViT-L/16 compile time with and without compute.scan, and its memory plan with and without
# compute.remat. Prints a markdown block for BENCHMARKS.md (also saved as gpu_check.md in
# OUT_DIR, default the current directory).
#
#   bash launch/gpu_check.sh           # on the accelerator machine, mae_jax[cuda] installed
#   bash launch/gpu_check.sh --dry     # the same sequence on a tiny model, on the CPU (seconds)
#
# Environment: PYTHON (default: the checkout's .venv/bin/python if present, else python3),
# OUT_DIR (where gpu_check.md goes), GPU_CHECK_TIMEOUT (seconds, default 480: the check stops
# there rather than run past its budget).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ -z "${PYTHON:-}" ]; then
  if [ -x "$ROOT/.venv/bin/python" ]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi
OUT_DIR="${OUT_DIR:-.}"
args=(--report=accelerator)
case "${1:-}" in
  --dry)
    args+=(--dry)
    # JAX on the CPU; TensorFlow (the input pipeline, unused here) kept off any GPU.
    export JAX_PLATFORMS=cpu
    ;;
  "") ;;
  *)
    echo "usage: bash launch/gpu_check.sh [--dry]" >&2
    exit 2
    ;;
esac
mkdir -p "$OUT_DIR"
cd "$ROOT"
"$PYTHON" -c "import jax; d = jax.devices()[0]; print(f'devices: {len(jax.devices())} x {d.device_kind} ({d.platform})')"
timeout "${GPU_CHECK_TIMEOUT:-480}" "$PYTHON" -m mae_jax.bench "${args[@]}" | tee "$OUT_DIR/gpu_check.md"
