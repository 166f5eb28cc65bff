#!/usr/bin/env bash
# Install the pack the way ComfyUI-Manager does and run every example workflow in a real ComfyUI server.
#
#   bash benchmarks/comfyui_manager_install.sh /path/to/ComfyUI [venv-dir]
#
# A fresh venv gets ComfyUI's requirements.txt and then this pack's requirements.txt only (no `pip install` of
# the pack, no test extras); the pack is the repository as a plain folder (tests/test_comfyui_integration.py puts
# it in custom_nodes/). TORCH_CONSTRAINTS (default: torch==2.13.0) pins the torch build; ComfyUI's torchaudio is
# left out where no wheel matches it. Long (a full install): a maintainer's check, not part of CI.
set -euo pipefail
COMFYUI=${1:?usage: $0 /path/to/ComfyUI [venv-dir]}
VENV=${2:-$(mktemp -d)/venv}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
CONSTRAINTS=$(mktemp)
printf '%s\n' ${TORCH_CONSTRAINTS:-torch==2.13.0} > "$CONSTRAINTS"
python3 -m venv "$VENV"
grep -v '^torchaudio' "$COMFYUI/requirements.txt" > "$CONSTRAINTS.comfy"
"$VENV/bin/pip" install -q -c "$CONSTRAINTS" -r "$CONSTRAINTS.comfy"
"$VENV/bin/pip" install -q -c "$CONSTRAINTS" -r "$ROOT/requirements.txt"
"$VENV/bin/python" -c "import torchvision" || {
  echo "ComfyUI cannot start in $VENV: its torchvision does not load with this torch (a CUDA-only wheel for a CPU torch?)" >&2
  exit 1; }
cd "$ROOT"
COMFYUI_PATH="$COMFYUI" COMFYUI_PYTHON="$VENV/bin/python" python -m pytest -q -m slow tests/test_comfyui_integration.py
