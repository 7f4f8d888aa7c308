"""Plot one run's metrics.jsonl: the forget and retain losses, lambda and the erasure signal against the step,
with the steps of its erasure checks marked where it made any (checks.jsonl).

    python scripts/plot_run.py runs/vangogh --output run.png [--smooth 10]

Losses are noisy step to step (one batch each); --smooth N draws a centred moving mean over N steps over the raw
values.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def moving_mean(values: list[float], n: int) -> list[float]:
    half = n // 2
    return [sum(values[max(0, i - half):i + half + 1]) / len(values[max(0, i - half):i + half + 1])
            for i in range(len(values))]


def plot(run: Path, output: Path, smooth: int = 10, title: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in read_jsonl(run / "metrics.jsonl") if "loss_forget" in r]
    if not rows:
        raise SystemExit(f"{run}/metrics.jsonl holds no training step (a closed-form edit has none)")
    steps = [r["step"] for r in rows]
    checks = read_jsonl(run / "checks.jsonl") if (run / "checks.jsonl").is_file() else []
    panels = [("forget loss", "loss_forget"), ("retain loss", "loss_retain"), ("lambda", "lambda")]
    if any("erasure_signal" in r for r in rows):
        panels.append(("erasure signal", "erasure_signal"))
    fig, axes = plt.subplots(len(panels), 1, figsize=(7, 1.9 * len(panels)), sharex=True)
    for ax, (name, key) in zip(axes, panels):
        values = [r.get(key) for r in rows]
        xs = [s for s, v in zip(steps, values) if v is not None]
        ys = [v for v in values if v is not None]
        if key.startswith("loss") and smooth > 1:
            ax.plot(xs, ys, color="0.8", linewidth=0.6)
            ax.plot(xs, moving_mean(ys, smooth), color="C0", linewidth=1.2, label=f"mean of {smooth} steps")
            ax.legend(loc="upper right", fontsize=7)
        elif key == "erasure_signal":
            from concept_erase.config import SIGNAL_STOP

            ax.plot(xs, ys, color="0.8", linewidth=0.6)
            ax.plot(xs, [r.get("erasure_signal_avg") for r in rows if r.get(key) is not None], color="C2",
                    linewidth=1.2, label="its running average")
            ax.axhline(SIGNAL_STOP, color="C3", linestyle="--", linewidth=0.8, label=f"stop level {SIGNAL_STOP}")
            ax.legend(loc="upper right", fontsize=7)
        else:
            ax.plot(xs, ys, color="C1", linewidth=1.2)
        for check in checks:
            ax.axvline(check["step"], color="C3" if check.get("at_target") else "0.85", linewidth=0.6, zorder=0)
        ax.set_ylabel(name, fontsize=8)
        ax.tick_params(labelsize=7)
    axes[-1].set_xlabel("step", fontsize=8)
    if title:
        axes[0].set_title(title, fontsize=9)
    fig.tight_layout()
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=110)
    plt.close(fig)
    return output


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a run folder (it holds metrics.jsonl)")
    parser.add_argument("--output", type=Path, required=True, help="the PNG to write")
    parser.add_argument("--smooth", type=int, default=10, help="moving mean of the losses over N steps (1: none)")
    parser.add_argument("--title", default="", help="a title over the plot")
    args = parser.parse_args(argv)
    if not (args.run / "metrics.jsonl").is_file():
        print(f"plot_run: {args.run} holds no metrics.jsonl; give a run folder", file=sys.stderr)
        return 2
    print(plot(args.run, args.output, args.smooth, args.title))
    return 0


if __name__ == "__main__":
    sys.exit(main())
