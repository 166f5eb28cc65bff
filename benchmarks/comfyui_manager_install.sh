#!/usr/bin/env bash
# Install the pack the way ComfyUI-Manager does and run every example workflow in a real ComfyUI server.
#
#   bash benchmarks/comfyui_manager_install.sh /path/to/ComfyUI [venv-dir]
#
# A fresh venv gets ComfyUI's requirements.txt and then this pack's requirements.txt only (no `pip install` of
# the pack, no test extras); the pack is the repository as a plain folder (tests/test_comfyui_integration.py puts
# it in custom_nodes/). TORCH_CONSTRAINTS (default: torch==2.13.0) pins the torch build; ComfyUI's torchaudio is
# left out where no wheel matches it. First every example workflow runs through the node functions
# (examples/comfyui/run_workflow.py), then, when ComfyUI can start, through a real server. Long (a full install):
# a maintainer's check, not part of CI.
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
if ! "$VENV/bin/python" -c "import torchvision" 2>/dev/null; then
  # a torchvision that cannot load breaks transformers' imports too; without it the node functions still run
  echo "torchvision does not load with this torch (a CUDA-only wheel for a CPU torch?): removed for the node check" >&2
  "$VENV/bin/pip" uninstall -q -y torchvision
  NO_SERVER=1
fi
# every example workflow, as ComfyUI would queue it, through the pack's node functions (the pack as a plain folder)
OUT=$(mktemp -d)
for workflow in "$ROOT"/tests/workflows/*_api.json; do
  (cd "$OUT" && "$VENV/bin/python" "$ROOT/examples/comfyui/run_workflow.py" "$workflow" --out-dir "$OUT" | tail -1)
done
if [ -n "${NO_SERVER:-}" ]; then
  echo "ComfyUI's server cannot start in $VENV without torchvision: the real-server test is skipped" >&2
  exit 1
fi
cd "$ROOT"
COMFYUI_PATH="$COMFYUI" COMFYUI_PYTHON="$VENV/bin/python" python -m pytest -q -m slow tests/test_comfyui_integration.py
