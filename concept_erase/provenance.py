"""What every output records about how it was made: the command line, package versions, the machine, the time.

`run.json` (erase), `results.json` (eval, attack) and `bench.json` carry the same fields, so that a result found
months later says which code and which machine produced it.
"""

from __future__ import annotations

import os
import platform
import shlex
import subprocess
import sys
import time
from importlib import metadata

PACKAGES = ["concept-erase", "torch", "diffusers", "transformers", "accelerate", "peft", "safetensors", "torchmetrics",
            "open-clip-torch", "torch-fidelity", "nudenet", "huggingface-hub"]


def versions() -> dict:
    out = {"python": platform.python_version()}
    for p in PACKAGES:
        try:
            out[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            out[p] = None
    return out


def machine() -> str:
    """The CPU, its cores, torch's threads and the GPU(s), in one line."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            names = [line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")]
        if names:
            cpu = names[0]
    except OSError:
        pass
    if torch.cuda.is_available():
        n = torch.cuda.device_count()
        gpu = f"{n} x {torch.cuda.get_device_name(0)}"
    else:
        gpu = "no GPU"
    return (f"{platform.node()}: {cpu}, {os.cpu_count()} logical CPUs, torch threads {torch.get_num_threads()}, {gpu}; "
            f"{platform.platform()}, Python {platform.python_version()}, torch {torch.__version__}")


def command_line() -> str:
    """How this process was started, as a shell would take it back."""
    name = os.path.basename(sys.argv[0]) if sys.argv else "python"
    if name in ("__main__.py", "cli.py"):
        name = "concept-erase"
    return " ".join([name, *map(shlex.quote, sys.argv[1:])])


def commit() -> str | None:
    """The git commit of the code that runs ("+changes" when the checkout has uncommitted changes to tracked files),
    or None outside a git checkout (an installed wheel)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        head = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        if head.returncode:
            return None
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + ("+changes" if dirty.stdout.strip() else "")


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def record(started: str = "") -> dict:
    """The fields every output carries; `started`: when the work began (default: now)."""
    return {"command": command_line(), "started": started or now(), "machine": machine(), "versions": versions()}
