#!/usr/bin/env bash
# Build the wheel, install it (not editable) in a fresh venv and run the README's main job from an empty folder.
#
#   bash benchmarks/wheel_install.sh [venv-dir]
#
# Checks that the wheel holds the built-in model (weights, configs, tokenizer files) and the ComfyUI nodes' web
# docs, that `hart generate` writes an image, and that `hart --help` answers without importing torch. Needs the
# package index (a few minutes: a full install); TORCH_CONSTRAINTS (default: torch==2.13.0) pins the torch build.
# A maintainer's check, not part of CI.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
WORK=$(mktemp -d)
VENV=${1:-$WORK/venv}
printf '%s\n' ${TORCH_CONSTRAINTS:-torch==2.13.0} > "$WORK/constraints.txt"
python3 -m pip wheel -q --no-deps --no-build-isolation -w "$WORK/dist" "$ROOT"
WHEEL=$(ls "$WORK"/dist/*.whl)
echo "wheel: $(basename "$WHEEL") ($(du -h "$WHEEL" | cut -f1))"
python3 - "$WHEEL" <<'PY'
import sys, zipfile
names = set(zipfile.ZipFile(sys.argv[1]).namelist())
need = ["hart_pipeline/default_model/model_index.json", "hart_pipeline/default_model/transformer/config.json",
        "hart_pipeline/default_model/transformer/diffusion_pytorch_model.safetensors",
        "hart_pipeline/default_model/vae/diffusion_pytorch_model.safetensors",
        "hart_pipeline/default_model/residual_head/diffusion_pytorch_model.safetensors",
        "hart_pipeline/default_model/scheduler/scheduler_config.json", "comfy_nodes/web/docs/HARTLoader.md",
        "comfy_nodes/web/icon.svg"]
missing = [n for n in need if n not in names]
for folder in ("text_encoder", "tokenizer"):  # the built-in model's own text encoder, when it ships one
    if any(n.startswith(f"hart_pipeline/default_model/{folder}/") for n in names):
        print(f"  ships default_model/{folder}/")
print("  missing from the wheel:", missing or "nothing")
sys.exit(1 if missing else 0)
PY
python3 -m venv "$VENV"
"$VENV/bin/pip" install -q -c "$WORK/constraints.txt" "$WHEEL"
mkdir -p "$WORK/empty" && cd "$WORK/empty"
python3 - "$VENV/bin/hart" <<'PY'
import subprocess, sys, time
start = time.perf_counter()
subprocess.run([sys.argv[1], "--help"], check=True, capture_output=True)
print(f"  hart --help: {time.perf_counter() - start:.2f} s")
PY
"$VENV/bin/python" -c "import sys; from hart_pipeline.cli import build_parser; build_parser().parse_args(['generate', 'x']); print('  torch imported while parsing:', 'torch' in sys.modules)"
"$VENV/bin/hart" generate "a red circle above a blue square" --out image.png
"$VENV/bin/python" -c "from PIL import Image; im = Image.open('image.png'); print('  image.png', im.size, im.mode)"
echo "OK: the wheel installs and runs the main job ($VENV)"
