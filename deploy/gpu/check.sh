#!/usr/bin/env bash
# Verify the vLLM agent path on a GPU host with a real model, and print decision latencies.
#
#   deploy/gpu/check.sh Qwen/Qwen2.5-VL-7B-Instruct          # in-process + vllm serve, bf16
#   MODEL_ARGS="--load-format dummy" deploy/gpu/check.sh /models/qwen2.5-vl-7b-config-only
#
# Needs: pip install -e '.[agents,vllm]' (PyPI vllm, CUDA torch) in the active Python (or PYTHON=...).
# Reports p50/p99 per setting (1 or 4 frames, 1 or 2 prompt conditions, last-token or last-token+mean-image
# activations of every layer), in-process and through `vllm serve` on loopback; then compares the first
# decisions with the transformers backend (action agreement, activation difference). Last line: JSON.
# Reference (REFERENCE.md §7): Qwen2.5-VL-7B-sized model in plain transformers, bf16, H200: 59 ms p50 for
# one decision over 4 frames with every layer's last-token state.
set -euo pipefail
MODEL="${1:?usage: deploy/gpu/check.sh MODEL [extra args for check_vllm.py]}"
shift || true
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
PYTHON="${PYTHON:-python}"
cd "$ROOT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
"$PYTHON" - <<'PY'
import torch, vllm
print(f"vllm {vllm.__version__}  torch {torch.__version__}  cuda {torch.cuda.is_available()}"
      + (f"  {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""))
PY
nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv,noheader 2>/dev/null || true
COMPARE="--compare-transformers"
[[ "${MODEL_ARGS:-}" == *dummy* ]] && COMPARE=""   # random weights: no transformers checkpoint to compare with
exec "$PYTHON" deploy/gpu/check_vllm.py --model "$MODEL" --server $COMPARE ${MODEL_ARGS:-} "$@"
