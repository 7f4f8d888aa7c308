"""FSDP check: the trainer's sharded path (FSDP2 through Accelerate) against its plain path, on CUDA GPUs.

Accelerate runs FSDP on CUDA only (on a CPU it falls back to plain data parallelism), so this stays out of the
test suite and runs where GPUs are. For each case it makes a plain run (one process, no FSDP) and a run
launched with the shipped configuration (`pipelines/accelerate-fsdp-{flux,sd3}.yaml`) on N processes, and
compares them step by step: the forget and retain losses, lambda, and the final weights. Exact agreement is not
expected (FSDP gathers the weights in bf16 for each block and reduces gradients across processes, where the plain
run's autocast casts per operation), closeness is; on every rank lambda must be the same (run.json's "ranks").
Then a resume inside FSDP: N steps in one go against N/2, stop, and `--resume latest` to N.

Usage (on a machine with GPUs; one GPU checks the sharded code path at world size 1):
    python scripts/fsdp_check.py --output runs/fsdp [--model builtin:tiny-flux] [--processes 2]
Writes OUTPUT/fsdp.md and OUTPUT/fsdp.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CASES = [("lora", "eupmu"), ("xattn", "eupmu"), ("xattn", "ungrad"), ("noxattn", "eupmu")]


def erase_args(model: str, out: Path, cache: Path, train: str, method: str, steps: int) -> list[str]:
    return ["erase", "--model", model, "--concept", "a cat", "--anchor", "a dog", "--anchor", "a house",
            "--output", str(out), "--train", train, "--method", method, "--steps", str(steps),
            "--sampling-steps", "3", "--anchor-inference-steps", "2", "--anchor-images-per-prompt", "2",
            "--mixed-precision", "bf16", "--lr", "1e-3", "--lambda", "1.0", "--checkpoint-every", str(steps // 2),
            "--checkpoints-total-limit", "0", "--cache-dir", str(cache), "--no-progress", "--overwrite",
            "--lora-rank", "4"]


def run(cmd: list[str], log: Path) -> float:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=str(ROOT))
    if proc.returncode:
        print(log.read_text()[-4000:], flush=True)
        raise SystemExit(f"failed (exit {proc.returncode}): {' '.join(cmd)}")
    return time.perf_counter() - t0


def plain(args: list[str], log: Path) -> float:
    return run([sys.executable, "-m", "concept_erase", *args], log)


def sharded(args: list[str], log: Path, config: Path, processes: int) -> float:
    return run([sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), "--num_processes",
                str(processes), "--main_process_port", "29517", "-m", "concept_erase", *args], log)


def rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def weights(out: Path):
    from safetensors.torch import load_file

    return load_file(str(out / "erased.safetensors"))


def relative_gap(a, b) -> float:
    import torch

    num = sum(float(torch.linalg.vector_norm(a[k].float() - b[k].float())) ** 2 for k in a) ** 0.5
    den = sum(float(torch.linalg.vector_norm(a[k].float())) ** 2 for k in a) ** 0.5
    return num / max(den, 1e-30)


def compare(a: Path, b: Path) -> dict:
    ra, rb = rows(a), rows(b)
    worst = {}
    for key in ("loss_forget", "loss_retain", "lambda"):
        pairs = [(x[key], y[key]) for x, y in zip(ra, rb) if x.get(key) is not None and y.get(key) is not None]
        worst[key] = max((abs(x - y) / max(abs(x), 1e-12) for x, y in pairs), default=0.0)
    wa, wb = weights(a), weights(b)
    run_b = json.loads((b / "run.json").read_text())
    ranks = run_b.get("ranks", [])
    return {"steps": (len(ra), len(rb)), "same_names": set(wa) == set(wb),
            "weights_relative_gap": relative_gap(wa, wb) if set(wa) == set(wb) else None,
            "worst_relative": worst, "lambda_plain": [r["lambda"] for r in ra], "lambda_fsdp": [r["lambda"] for r in rb],
            "ranks": len(ranks), "ranks_agree": len({json.dumps(r["lambda_history"]) for r in ranks}) <= 1
            and len({r["weights_digest"] for r in ranks}) <= 1}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output", default="runs/fsdp")
    parser.add_argument("--model", default="builtin:tiny-flux")
    parser.add_argument("--processes", type=int, default=0, help="FSDP processes (default: one per GPU)")
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()
    import torch

    if not torch.cuda.is_available():
        print("fsdp_check: no CUDA GPU here; Accelerate runs FSDP on CUDA only (on a CPU it falls back to plain "
              "data parallelism). Run this on a machine with GPUs.", file=sys.stderr)
        return 2
    processes = args.processes or torch.cuda.device_count()
    family = "sd3" if "sd3" in args.model else "flux"
    config = ROOT / "pipelines" / f"accelerate-fsdp-{family}.yaml"
    root = Path(args.output).resolve()
    root.mkdir(parents=True, exist_ok=True)
    cache = root / "cache"
    results = []
    for train, method in CASES:
        name = f"{train}-{method}"
        print(f"== {name}: plain, then FSDP on {processes} process(es)", flush=True)
        a, b = root / f"{name}-plain", root / f"{name}-fsdp"
        ta = plain(erase_args(args.model, a, cache, train, method, args.steps), root / f"{name}-plain.log")
        tb = sharded(erase_args(args.model, b, cache, train, method, args.steps), root / f"{name}-fsdp.log", config,
                     processes)
        res = {"case": name, "plain_s": round(ta, 1), "fsdp_s": round(tb, 1), **compare(a, b)}
        print(json.dumps(res), flush=True)
        results.append(res)
    # resume inside FSDP: steps/2, then --resume latest to steps, against the uninterrupted FSDP run above
    name = "lora-eupmu"
    half = root / f"{name}-fsdp-resumed"
    first = erase_args(args.model, half, cache, "lora", "eupmu", args.steps)
    first[first.index("--steps") + 1] = str(args.steps // 2)
    sharded(first, root / "resume-1.log", config, processes)
    second = erase_args(args.model, half, cache, "lora", "eupmu", args.steps)
    second.remove("--overwrite")
    sharded([*second, "--resume", "latest"], root / "resume-2.log", config, processes)
    full_run = weights(root / f"{name}-fsdp")
    resumed = weights(half)
    import torch as _t

    exact = set(full_run) == set(resumed) and all(_t.equal(full_run[k], resumed[k]) for k in full_run)
    resume = {"case": "resume", "exact": exact, "weights_relative_gap": relative_gap(full_run, resumed),
              "lambda_uninterrupted": [r["lambda"] for r in rows(root / f"{name}-fsdp")],
              "lambda_resumed": [r["lambda"] for r in rows(half)]}
    print(json.dumps(resume), flush=True)
    gpu = torch.cuda.get_device_name()
    (root / "fsdp.json").write_text(json.dumps({"gpu": gpu, "processes": processes, "model": args.model,
                                                "cases": results, "resume": resume}, indent=2))
    lines = [f"# FSDP check ({args.model}, {processes} process(es) on {gpu}, torch {torch.__version__})", "",
             f"Command: `python scripts/fsdp_check.py {' '.join(sys.argv[1:])}`; configuration "
             f"`{config.relative_to(ROOT)}`; {args.steps} steps, bf16.", "",
             "| case | plain s | FSDP s | worst relative gap: forget loss | retain loss | lambda | final weights | "
             "ranks agree |", "|---|---|---|---|---|---|---|---|"]
    for r in results:
        w = r["worst_relative"]
        lines.append(f"| {r['case']} | {r['plain_s']} | {r['fsdp_s']} | {w['loss_forget']:.2e} | {w['loss_retain']:.2e} | "
                     f"{w['lambda']:.2e} | {r['weights_relative_gap']:.2e} | {r['ranks_agree']} ({r['ranks']} ranks) |")
    lines += ["", f"Resume under FSDP ({args.steps // 2} steps, stop, --resume latest to {args.steps}) against the "
                  f"uninterrupted FSDP run: {'bit-exact' if exact else 'NOT exact'} (relative weight gap "
                  f"{resume['weights_relative_gap']:.2e}).", ""]
    (root / "fsdp.md").write_text("\n".join(lines))
    for d in root.glob("*-plain"):
        shutil.rmtree(d, ignore_errors=True)
    print(f"report: {root / 'fsdp.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
