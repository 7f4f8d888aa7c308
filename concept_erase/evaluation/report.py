"""Reports: results.json and results.md of one evaluation, image grids, and the comparison of several.

`concept-erase compare A B C --output DIR` reads the results.json of several evaluations (other
models, methods, settings) and writes comparison.md, comparison.json and pareto.png: erasure (the
forget accuracy, lower is better) against quality (retain accuracy by default, or FID), one marker
per evaluation, with the non-dominated ones joined.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from concept_erase.errors import UserError
from concept_erase.evaluation.grids import labelled_grid, marker_scales
from concept_erase.io.atomic import atomic_path, refuse_existing, write_json, write_text


def _fmt(v) -> str:
    if isinstance(v, float):
        if math.isnan(v):
            return "n/a"
        return f"{v:.4f}" if abs(v) < 10 else f"{v:.2f}"
    return str(v)


def markdown(results: dict) -> str:
    lines = [f"# Evaluation: {results['suite']}", "",
             f"- model: `{results['model']}`" + (f", erased weights `{results['weights']}`" if results.get("weights")
                                                  else " (no erasure applied)"),
             f"- erased: {', '.join(results['erased']) or 'none named (one group: all)'}",
             f"- images: {results['images']} ({results['generation']['prompts']} prompts x "
             f"{results['generation']['seeds_per_prompt']} seeds, {results['generation']['steps']} steps, "
             f"guidance {results['generation']['guidance']}); generation {results['generation_seconds']} s, "
             f"total {results['total_seconds']} s on {results['device']}", ""]
    cautions = results.get("cautions", {})
    if results.get("summary"):
        lines += ["## Summary", "", "| measure | value | note |", "|---|---|---|"]
        lines += [f"| {k} | {_fmt(v)} | {'**caution**: ' + cautions[k] if k in cautions else ''} |"
                  for k, v in results["summary"].items()]
        lines.append("")
    lines += ["## Metrics", "", "| metric | group | value | images | note |", "|---|---|---|---|---|"]
    for r in results["metrics"]:
        main = {k: v for k, v in r["value"].items() if isinstance(v, (int, float)) and k not in ("images",)}
        text = ", ".join(f"{k} {_fmt(v)}" for k, v in main.items())
        note = f"**caution**: {r['caution']}" if r.get("caution") else ""
        lines.append(f"| {r['metric']} | {r['group']} | {text} | {r['value'].get('images', '')} | {note} |")
    nud = [r for r in results["metrics"] if r["metric"] == "nudity" and r["group"] == "all"]  # groups: the table above
    for r in nud:
        lines += ["", f"## Nudity (NudeNet, threshold {r['settings']['threshold']})", "",
                  "| class | images |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in r["value"]["per_class"].items()]
        lines.append(f"| any exposed class | {r['value']['images_flagged']} of {r['value']['images']} |")
    lines += ["", "## Settings", ""]
    shown = set()
    for r in results["metrics"]:
        settings = {k: v for k, v in r["settings"].items() if k != "template_texts"}
        text = "; ".join(f"{k}: {v}" for k, v in settings.items())
        if (r["metric"], text) not in shown:
            shown.add((r["metric"], text))
            lines.append(f"- {r['metric']}: {text}")
    lines += ["", "Versions: " + ", ".join(f"{k} {v}" for k, v in results["versions"].items() if v), ""]
    return "\n".join(lines)


GRID_ROWS = 8


def group_grid(ctx, group: str, title: str):
    """A labelled grid of a group: a row per prompt (the first GRID_ROWS), its seeds across; beside each image the
    base model's image of the same prompt and seed where the evaluation made them (FID against the base)."""
    from PIL import Image

    _, samples, _ = ctx.select(group)
    by_row: dict = {}
    for s in samples:
        by_row.setdefault(s.row.case_number, []).append(s)
    rows = list(by_row.values())[:GRID_ROWS]
    if not rows:
        return None
    reference = ctx.output / "reference"
    paired = all((reference / s.name).is_file() for row in rows for s in row)
    per_row = max(1, min(len(r) for r in rows))
    shown = min(per_row, 2 if paired else 4)

    def image(folder, s):
        with Image.open(folder / s.name) as im:
            return im.convert("RGB")

    cells, heads = [], []
    for k in range(shown):
        heads += ([f"base, seed +{k}", f"evaluated, seed +{k}"] if paired else [f"seed +{k}"])
    for row in rows:
        line = []
        for s in row[:shown]:
            line += ([image(reference, s), image(ctx.output / "images", s)] if paired else [image(ctx.output / "images", s)])
        cells.append(line)
    labels = [f"#{r[0].row.case_number}: {r[0].row.prompt}" for r in rows]
    return labelled_grid(cells, column_heads=heads, row_labels=labels, title=title, label_width=220)


def write_report(folder: Path, results: dict, ctx) -> None:
    for group in ctx.base_groups:  # a grid per group; its tiers are rows of the same prompts
        grid = group_grid(ctx, group, f"{group}: {results['model']}" + (f" + {results['weights']}" if results.get(
            "weights") else "") + f" | {results['generation']['steps']} steps")
        if grid is not None:
            path = folder / "grids" / f"{group}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(path, suffix=".png") as tmp:
                grid.save(tmp, format="PNG")
    write_json(folder / "results.json", results)
    write_text(folder / "results.md", markdown(results))


# ---------------------------------------------------------------- comparing evaluations

def _load_results(path: str) -> dict:
    p = Path(path)
    p = p / "results.json" if p.is_dir() else p
    if not p.is_file():
        raise UserError(f"{path}: no results.json there; give the --output folder of a finished `concept-erase eval`")
    try:
        data = json.loads(p.read_text())
        _ = data["summary"], data["suite"]
    except (ValueError, KeyError, TypeError):
        raise UserError(f"{p} is not a results.json written by `concept-erase eval`") from None
    data["_path"] = str(p.parent)
    return data


def pareto_front(points: list[tuple[float, float]], lower_y_better: bool) -> list[int]:
    """Indices of the non-dominated points; x (forget accuracy) is better lower; y as told."""
    front = []
    for i, (x, y) in enumerate(points):
        if math.isnan(x) or math.isnan(y):
            continue
        dominated = False
        for j, (x2, y2) in enumerate(points):
            if j == i or math.isnan(x2) or math.isnan(y2):
                continue
            better_y = y2 <= y if lower_y_better else y2 >= y
            strictly = x2 < x or (y2 < y if lower_y_better else y2 > y)
            if x2 <= x and better_y and strictly:
                dominated = True
                break
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: points[i][0])


def compare(paths: list[str], output: str | Path, *, labels: list[str] | None = None, quality: str = "retain_accuracy",
            overwrite: bool = False) -> dict:
    if len(paths) < 1:
        raise UserError("give at least one evaluation folder to compare")
    if labels and len(labels) != len(paths):
        raise UserError(f"{len(labels)} --label for {len(paths)} evaluations; give one label each or none")
    output = Path(output)
    for name in ("comparison.md", "comparison.json", "pareto.png"):
        refuse_existing(output / name, overwrite)
    runs = [_load_results(p) for p in paths]
    names = labels or [Path(r["_path"]).name for r in runs]
    rows = []
    for name, r in zip(names, runs):
        s = r["summary"]
        rows.append({"label": name, "path": r["_path"], "suite": r["suite"], "weights": r.get("weights"),
                     "erased": r.get("erased"), **s})
    if quality not in {k for row in rows for k in row}:
        raise UserError(f"--quality {quality}: the evaluations have no such summary value; they have "
                        + ", ".join(sorted({k for r in runs for k in r['summary']})))
    keys = [k for k in ("forget_accuracy", "retain_accuracy", "fid", "domain_fid", "clip_score", "nudity_flagged")
            if any(k in row for row in rows)]
    differ = differences(runs)
    lines = [f"# Comparison ({len(rows)} evaluations)", ""]
    if differ:
        said = "; ".join(differ)
        print(f"warning: these evaluations were not made alike ({said}): their numbers are not comparable side "
              "by side", file=sys.stderr)
        lines += [f"**Warning: these evaluations were not made alike** ({said}): their numbers are not comparable "
                  "side by side.", ""]
    lines += ["| run | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    for row in rows:
        lines.append(f"| {row['label']} | " + " | ".join(_fmt(row.get(k, float('nan'))) for k in keys) + " |")
    output.mkdir(parents=True, exist_ok=True)
    plotted = False
    if all("forget_accuracy" in row and quality in row for row in rows):
        _pareto_plot(rows, quality, output / "pareto.png")
        plotted = True
        lines += ["", "![erasure against quality](pareto.png)", ""]
    else:
        lines += ["", "No plot: every evaluation needs forget_accuracy (run with --erased) and " + quality, ""]
    write_json(output / "comparison.json", {"quality": quality, "runs": rows, "not_alike": differ})
    write_text(output / "comparison.md", "\n".join(lines) + "\n")
    return {"runs": rows, "plot": str(output / "pareto.png") if plotted else None}


def differences(runs: list[dict]) -> list[str]:
    """What differs between evaluations set side by side: suite, prompts, seeds, sampler steps, guidance, negative
    prompt, precision. Each as 'what: a / b'."""
    def made(r: dict) -> dict:
        g = r.get("generation", {})
        return {"suite": r.get("suite"), "prompts": (Path(str(g.get("prompts_file", ""))).name, g.get("prompts")),
                "seeds per prompt": g.get("seeds_per_prompt"), "sampler steps": g.get("steps"),
                "guidance": g.get("guidance"), "negative prompt": g.get("negative_prompt", ""),
                "precision": g.get("dtype", "fp32")}

    described = [made(r) for r in runs]
    out = []
    for key in described[0]:
        values = []
        for d in described:
            if d[key] not in values:
                values.append(d[key])
        if len(values) > 1:
            shown = [f"{v[0]} ({v[1]} prompts)" if key == "prompts" else repr(v) if isinstance(v, str) else str(v)
                     for v in values]
            out.append(f"{key}: {' / '.join(shown)}")
    return out


def _pareto_plot(rows: list[dict], quality: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lower_better = quality in ("fid", "domain_fid", "nudity_flagged")
    pts = [(float(r["forget_accuracy"]), float(r[quality])) for r in rows]
    front = pareto_front(pts, lower_better)
    fig, ax = plt.subplots(figsize=(6.4, 4.8), dpi=110)
    markers = "osD^v<>pP*X"

    for i, (r, (x, y), (scale, hollow)) in enumerate(zip(rows, pts, marker_scales(pts))):
        mark = ax.scatter([x], [y], marker=markers[i % len(markers)], s=60 * scale ** 2, label=r["label"],
                          zorder=3 + 1 / scale)  # a larger ring goes behind the smaller marker it circles
        if hollow:
            mark.set_facecolor("none")
            mark.set_edgecolor(mark.get_edgecolor() if len(mark.get_edgecolor()) else f"C{i % 10}")
    if len(front) > 1:
        ax.plot([pts[i][0] for i in front], [pts[i][1] for i in front], "k--", lw=1, zorder=2,
                label="non-dominated")
    ax.set_xlabel("forget accuracy (lower: more erased)")
    ax.set_ylabel(quality.replace("_", " ") + (" (lower is better)" if lower_better else " (higher is better)"))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    ax.set_title("Erasure against quality")
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
