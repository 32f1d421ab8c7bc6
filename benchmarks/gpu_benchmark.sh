#!/usr/bin/env bash
# One-GPU benchmark of REPA's cost, offline. Run from anywhere:
#
#   bash benchmarks/gpu_benchmark.sh                      # writes gpu_benchmark.{log,json} here
#   OUT_DIR=/tmp/bench bash benchmarks/gpu_benchmark.sh --compile-modes off
#
# Arguments are passed on to gpu_benchmark.py. Nothing is downloaded: the encoder and the SiTs
# are randomly initialized (speed does not depend on weights), and the Hugging Face hub is
# switched to offline mode so that no lookup can stall the run.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"
out_dir="${OUT_DIR:-$PWD}"
mkdir -p "$out_dir"

export HF_HUB_OFFLINE=1
export TRANSFORMERS_OFFLINE=1
export PYTHONUNBUFFERED=1
# the repo's sources come first, so the script also runs from a plain checkout (no pip install)
export PYTHONPATH="$repo/src${PYTHONPATH:+:$PYTHONPATH}"
python="${PYTHON:-python3}"

{
    echo "# $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(hostname)"
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
    "$python" -c 'import torch, timm; print("torch", torch.__version__, "cuda", torch.version.cuda, "timm", timm.__version__)'
    "$python" "$here/gpu_benchmark.py" --json "$out_dir/gpu_benchmark.json" "$@"
} 2>&1 | tee "$out_dir/gpu_benchmark.log"
