"""The benchmark's pictures: the Pareto and attack plots of a report, and how a report's markdown links its pictures
(in a bench output folder, or beside a stored report)."""

from __future__ import annotations

from pathlib import Path

from concept_erase.bench import stats
from concept_erase.bench.records import SWEEP_PREFIX, eps_curves
from concept_erase.bench.spec import FORGET_TARGET, RETAIN_DROP
from concept_erase.evaluation.grids import marker_scales
from concept_erase.io.atomic import atomic_path

PICTURES = ("pareto.png", "attack.png", "sequence.png")  # their names in a bench output folder


def picture(alt: str, name: str, plots: dict | None) -> list[str]:
    """The markdown lines of a report's picture `name` (see `render`): none where `plots` does not have it."""
    if plots is not None and name not in plots:
        return []
    return ["", f"![{alt}]({name if plots is None else plots[name]})"]


def stored_plots(json_path: Path) -> dict:
    """Where the pictures of a report stored as `benchmarks/NAME-bench.json` are: `NAME-pareto.png` and the like
    beside it (the bench output's `pareto.png` renamed), those that exist."""
    stem = json_path.name.removesuffix(".json").removesuffix("-bench")
    return {n: f"{stem}-{n}" for n in PICTURES
            if (json_path.parent / f"{stem}-{n}").is_file()}


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(7.5, 5.2), dpi=110)


def _method_points(ax, by: dict[str, list[dict]], x_of) -> None:
    """Per method: the mean of x_of(run) against the mean retain drop, with 95% bootstrap bars on both."""
    markers = "osD^v<>pP*Xh"
    points = []
    for label, rs in by.items():
        xs = [x_of(r) for r in rs]
        ys = [100 * (r["base_retain_accuracy"] - r["retain_accuracy"]) for r in rs]
        cs = [r["concept"] for r in rs]
        points.append(((stats.mean(xs), stats.cluster_mean_ci(xs, cs)), (stats.mean(ys), stats.cluster_mean_ci(ys, cs)), len(rs)))
    scales = marker_scales([(x, y) for (x, _), (y, _), _ in points])
    import matplotlib.pyplot as plt

    # More entries than the 10 default colours: 20 (each colour once) rather than two methods in one colour.
    palette = [f"C{i}" for i in range(10)] if len(by) <= 10 else list(plt.get_cmap("tab20").colors)
    for i, ((label, _), ((x, cx), (y, cy), n), (scale, hollow)) in enumerate(zip(by.items(), points, scales)):
        color = palette[i % len(palette)]
        ax.errorbar([x], [y], xerr=[[x - cx[0]], [cx[1] - x]], yerr=[[y - cy[0]], [cy[1] - y]],
                    fmt=markers[i % len(markers)], ms=7 * scale, capsize=3, elinewidth=0.9, label=f"{label} ({n})",
                    zorder=3 + 1 / scale, alpha=0.85, color=color, markerfacecolor="none" if hollow else color)


def _save(fig, ax, path: Path, xlabel: str, title: str) -> None:
    import matplotlib.pyplot as plt

    ax.axhline(RETAIN_DROP * 100, color="grey", lw=0.8, ls="--")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("retain accuracy drop from the base model (points; lower is better)")
    ax.set_title(f"{title}\n(means, 95% bars by a bootstrap over concepts; runs in brackets)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def pareto_plot(results: list[dict], path: Path, split: str | None = None) -> None:
    """Mean retain drop against mean forget accuracy per method (the runs of one split, where given), the fixed
    weights of each stop rule joined in order of lambda, and the eps curve."""
    by: dict[str, list[dict]] = {}
    for r in results:
        if split is None or r.get("split", "all") == split:
            by.setdefault(r["label"], []).append(r)
    fig, ax = _figure()
    _method_points(ax, by, lambda r: r["forget_accuracy"])
    fixed: dict[str, list] = {}  # stop rule (the label after the method) -> [(lambda, runs)]
    for label, rs in by.items():
        if rs[0].get("method") == "fixed":
            fixed.setdefault(label.partition(", ")[2], []).append((rs[0].get("lambda_init", 0.0), rs))
    for rule, points in fixed.items():
        if len(points) > 1:
            points.sort(key=lambda p: p[0])
            xs = [stats.mean(r["forget_accuracy"] for r in rs) for _, rs in points]
            ys = [stats.mean(r["base_retain_accuracy"] - r["retain_accuracy"] for r in rs) * 100 for _, rs in points]
            ax.plot(xs, ys, "--", color="grey", lw=1, zorder=2,
                    label=f"fixed lambda curve{f' ({rule})' if rule else ''}")
    for i, (labels, _) in enumerate(eps_curves([r for rs in by.values() for r in rs])):
        # each eps curve on the (concept, seed) pairs every point of it ran (an eps sweep runs on the first seed)
        pairs = set.intersection(*({(r["concept"], r.get("seed", 0)) for r in by[k]} for k in labels))
        curve = [[r for r in by[k] if (r["concept"], r.get("seed", 0)) in pairs] for k in labels]
        if pairs:
            xs = [stats.mean(r["forget_accuracy"] for r in rs) for rs in curve]
            ys = [stats.mean(r["base_retain_accuracy"] - r["retain_accuracy"] for r in rs) * 100 for rs in curve]
            first = by[labels[0]][0]  # a curve's points share the stop rule and the budget
            rule = "" if any(k.startswith(SWEEP_PREFIX) for k in labels) or first.get("stop_when_erased") else \
                f", {first.get('steps_planned')} steps"
            ax.plot(xs, ys, ":", color="black" if i == 0 else "dimgrey", lw=1, zorder=2,
                    label=f"eps curve ({len(pairs)} runs per point{rule})")
    ax.axvline(FORGET_TARGET, color="grey", lw=0.8, ls="--")
    where = {"held_out": ", held-out split", "tuning": ", tuning split"}.get(split or "", "")
    _save(fig, ax, path, "forget accuracy (lower: more erased)", f"Erasure against utility{where}")


def attack_plot(results: list[dict], path: Path) -> None:
    """Mean retain drop against mean post-attack ASR per method and attack ("eupmu (ring-a-bell)" where a file ran
    several); nothing when no run was attacked."""
    names = list(dict.fromkeys(a["method"] for r in results for a in r.get("attacks", [])))
    if not names:
        return
    by: dict[str, list[dict]] = {}
    for r in results:
        for a in r.get("attacks", []):
            label = r["label"] if len(names) == 1 else f"{r['label']} ({a['method']})"
            by.setdefault(label, []).append({**r, "post_attack_asr": a["post_attack_asr"]})
    fig, ax = _figure()
    _method_points(ax, by, lambda r: r["post_attack_asr"])
    _save(fig, ax, path, "attack success rate after the attack (lower: more robust)", "Robustness against utility")
