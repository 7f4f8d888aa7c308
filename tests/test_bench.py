"""The benchmark: its plan, its target checks (pure), and one tiny real run end to end."""

import json
import re
from pathlib import Path

import pytest

from concept_erase.bench.report import markdown, summarise
from concept_erase.bench.spec import load_bench, plan
from concept_erase.digits.benchmark import concept_prompts
from concept_erase.errors import UserError

ROOT = Path(__file__).resolve().parent.parent


def test_shipped_benchmark_file_plans_every_method_concept_and_eps():
    spec = load_bench(ROOT / "pipelines" / "bench-digits.yaml")
    runs = plan(spec)
    labels = {r[0] for r in runs}
    assert {"eupmu", "eupmu-fast", "ungrad", "fixed 0.3", "fixed 1", "fixed 3", "esd"} <= labels
    assert {"eupmu eps=0.0003", "eupmu eps=0.001", "previous default", "eupmu, stop when erased"} <= labels
    # the statistical power the benchmark needs: 4 digits, 2 styles, 3 seeds, 64 images per prompt at the end
    styles = [c for c in spec.concepts if c in ("red ink", "blue ink", "inverted", "bold")]
    assert len(spec.concepts) - len(styles) >= 4 and len(styles) >= 2 and len(spec.seeds) >= 3
    assert spec.eval_final_seeds >= 64 and spec.held_time_reference == "previous default"
    n = len(spec.methods) * len(spec.concepts) * len(spec.seeds) + len(spec.eps_sweep) * len(spec.concepts)
    assert len(runs) == n == len({(r[0], r[2], r[3]) for r in runs})
    assert runs[0][2] == runs[len(spec.methods)][2]  # concept by concept: a cut-short run compares all methods
    sweep = next(r for r in runs if r[0] == "eupmu eps=0.001")
    assert sweep[1]["method"] == "eupmu" and sweep[1]["eps"] == 0.001


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "pipelines").glob("bench-*.yaml")))
def test_every_shipped_benchmark_file_loads(name):
    """Every method entry of every shipped benchmark file builds its run settings (load_bench checks them)."""
    spec = load_bench(ROOT / "pipelines" / name)
    assert plan(spec)


def test_settings_apply_to_every_entry_and_an_entry_overrides_them(tmp_path):
    """`settings:` pins what a whole file was measured with (e.g. an earlier default); an entry's own value wins,
    and the eps sweep inherits them with the eupmu entry's other settings."""
    from concept_erase.bench.spec import run_config, run_settings
    from concept_erase.config import load_yaml

    p = tmp_path / "b.yaml"
    p.write_text("concepts: [three]\nsettings: {retain-loss: denoising, steps: 30}\neps_sweep: [0.01]\n"
                 "methods: [{method: eupmu}, {method: fixed, steps: 20}]\n")
    spec = load_bench(p)
    got = {label: run_settings(run_config(spec, overrides, concept, seed, tmp_path / "x", False))
           for label, overrides, concept, seed in plan(spec)}
    assert {label: (s["retain_loss"], s["steps_planned"]) for label, s in got.items()} == {
        "eupmu": ("denoising", 30), "fixed": ("denoising", 20), "eupmu eps=0.01": ("denoising", 30)}
    # a stored run must also say its lr and trajectory model to pass for a planned one (--runs-from)
    recipe_lr = float(load_yaml(ROOT / "pipelines" / "digits-erase.yaml")["lr"])
    assert got["eupmu"]["lr"] == recipe_lr and got["eupmu"]["trajectory_model"] == "current"
    p.write_text("concepts: [three]\nsettings: {lr: 1.0e-4}\nmethods: [{method: eupmu}]\n")
    (label, overrides, concept, seed), = plan(load_bench(p))
    assert run_settings(run_config(load_bench(p), overrides, concept, seed, tmp_path / "x", False))[
        "lr"] == 1e-4  # settings: pins an lr the recipe no longer has
    p.write_text("concepts: [three]\nmethods: [{method: eupmu}]\n")
    assert run_settings(run_config(load_bench(p), {"method": "eupmu"}, "three", 0, tmp_path / "x", False))[
        "retain_loss"] == "preservation"  # the default


def test_a_closed_form_entry_takes_the_recipes_prompts_and_none_of_its_training(tmp_path):
    """UCE in a benchmark file: the recipe's training settings and the file's common ones are not its own (it would
    refuse them); a style's guide is its caption without the style, as negative guidance erases toward."""
    from concept_erase.bench.spec import run_config

    p = tmp_path / "b.yaml"
    p.write_text("concepts: [three, red ink]\nseeds: [4, 5]\nsettings: {steps: 30}\n"
                 "methods: [{method: eupmu}, {method: uce}]\n")
    spec = load_bench(p)
    # it draws nothing at random: once per concept, at the first seed
    assert sorted((label, seed) for label, _, concept, seed in plan(spec) if concept == "three") == [
        ("eupmu", 4), ("eupmu", 5), ("uce", 4)]
    configs = {(label, concept): run_config(spec, o, concept, seed, tmp_path / "x", False)
               for label, o, concept, seed in plan(spec)}
    assert configs["eupmu", "three"].steps == 30 and configs["eupmu", "three"].stop_when_erased
    edit = configs["uce", "three"]
    assert edit.method == "uce" and not edit.stop_when_erased and edit.remap_to == [] and edit.lr == 1e-5
    assert configs["uce", "red ink"].remap_to == [c.replace(" in red ink", "") for c in configs["uce", "red ink"].concepts]


def test_a_files_attacks_take_each_attacks_own_defaults(tmp_path):
    """Several attacks in one file, each with the settings it reads: Ring-A-Bell's 16 tokens and 100 generations on
    the shipped models, not UnlearnDiffAtk's 3 tokens; an attack with prompts 0 is left out."""
    p = tmp_path / "b.yaml"
    p.write_text("concepts: [three]\nmethods: [{method: esd}]\n"
                 "attack: [{method: unlearndiff, prompts: 2}, {method: ring-a-bell, prompts: 2}, "
                 "{method: textual-inversion, prompts: 0}]\n")
    assert load_bench(p).attacks == [
        {"method": "unlearndiff", "prompts": 2, "iterations": 10, "timesteps": 10, "tokens": 3},
        {"method": "ring-a-bell", "prompts": 2, "iterations": 100, "tokens": 16}]
    p.write_text("concepts: [three]\nmethods: [{method: esd}]\nattack: {prompts: 0}\n")
    assert load_bench(p).attacks == []


def test_concept_prompts():
    c, a = concept_prompts("seven")
    assert c == ["a handwritten digit seven"] and len(a) == 9 and c[0] not in a
    c, a = concept_prompts("red ink")
    assert len(c) == 10 and all("red ink" in p for p in c)
    assert len(a) == 40 and not any("red ink" in p for p in a)


@pytest.mark.parametrize("text,message", [
    ("concepts: [three]\nmethods: [{method: eupmu}]\nfoo: 1\n", "unknown key 'foo'"),
    ("concepts: [eleven]\nmethods: [{method: eupmu}]\n", "concept 'eleven' is neither a digit"),
    ("concepts: [three]\n", "methods must be a list"),
    ("methods: [{method: eupmu}]\n", "concepts must list concepts of the model.s world \\(digits, styles\\)"),
    ("concepts: [three]\nmethods: [{method: eupmu}]\nseeds: [a]\n", "seeds must be a list of numbers"),
    ("concepts: [three]\nmethods: [{method: eupmu}]\nseeds: [1.5]\n", "seeds must be whole numbers"),
    ("concepts: [three]\nmethods: [{method: eupmu}]\nevaluation: [1]\n", "evaluation must be a mapping"),
    ("concepts: [three]\nmethods: [{method: eupmu}]\nevaluation: {seeds: 0}\n", "evaluation.seeds must be a whole"),
    ("concepts: [three]\nmethods: [{method: eupmu}]\nevaluation: {sedes: 3}\n", "evaluation has no key 'sedes'"),
    ("concepts: [three]\nmethods: [{method: eupmu, lamda: 3}]\n", "method 'eupmu'.*unknown setting 'lamda'"),
    ("concepts: [three]\nmethods: [{method: fixed, lambda_init: -1}]\n", "method 'fixed'.*must be at least 0"),
    ("concepts: [three]\nmethods: [{method: nope}]\n", "unknown method 'nope'"),
    ("concepts: [three]\nmethods: [{method: fixed}, {method: fixed}]\n", "both labelled 'fixed'"),
    ("concepts: [three]\nmethods: [{method: esd, output: x}]\n", "output is set by the benchmark"),
    ("recipe: nowhere.yaml\nconcepts: [three]\nmethods: [{method: esd}]\n", "recipe 'nowhere.yaml' not found"),
    ("concepts: [three]\nmethods: [{method: esd}]\ntiming_probe: 3\n", "timing_probe must be a mapping"),
    ("concepts: [three]\nmethods: [{method: esd}]\ntiming_probe: {round: 3}\n", "timing_probe must be a mapping"),
    ("concepts: [three]\nmethods: [{method: esd}]\ntiming_probe: {steps: 0}\n", "timing_probe.steps must be a whole"),
    ("concepts: [three]\nmethods: [{method: esd}]\nheld_time_reference: eupmu\n", "'eupmu' is not the label of"),
    ("concepts: [three]\nmethods: [{method: esd}]\nevaluation: {final_seeds: -1}\n", "evaluation.final_seeds must"),
    ("concepts: [three]\nmethods: [{method: esd}]\nattack: {method: magic}\n", "attack.method 'magic' is not one of"),
    ("concepts: [three]\nmethods: [{method: esd}]\nattack: {tokens: 0}\n", "attack.tokens must be a whole"),
    ("concepts: [three]\nmethods: [{method: esd}]\nattack: {prompt: 3}\n", "attack must be a mapping with some of"),
    ("concepts: [three]\nmethods: [{method: esd}]\nattack: {method: ring-a-bell, timesteps: 2}\n",
     "attack.timesteps does nothing with attack.method ring-a-bell"),
    ("concepts: [three]\nmethods: [{method: esd}]\nattack: [{method: unlearndiff}, {method: magic}]\n",
     r"attack\[1\]\.method 'magic' is not one of"),
    ("concepts: [three]\nmethods: [{method: esd}]\nattack: [{method: unlearndiff}, {method: unlearndiff}]\n",
     r"attack\[1\] names unlearndiff a second time"),
    ("concepts: [three]\nmethods: [{method: esd}]\nattack: [3]\n", r"attack\[0\] must be a mapping"),
    ("concepts: [three]\nmethods: [{method: esd}]\nsettings: [1]\n", "settings must be a mapping"),
    ("concepts: [three]\nmethods: [{method: esd}]\nsettings: {label: x}\n", "settings must be a mapping"),
    ("concepts: [three]\nmethods: [{method: esd}]\nsettings: {lamda: 1}\n", "settings: unknown setting 'lamda'"),
])
def test_bad_benchmark_files(tmp_path, text, message):
    p = tmp_path / "b.yaml"
    p.write_text(text)
    with pytest.raises(UserError, match=message):
        load_bench(p)


def _run(label, concept, forget, retain, ms, base_retain=1.0, ttt=None):
    return {"label": label, "concept": concept, "forget_accuracy": forget, "retain_accuracy": retain,
            "base_retain_accuracy": base_retain, "domain_fid": 10.0, "step_time_s_median": ms / 1000,
            "backward_passes_per_step": 2.0 if label == "ungrad" else 1.0, "time_to_target_s": ttt,
            "meets_target": forget <= 0.1 and retain >= base_retain - 0.03}


def test_summary_checks_measure_and_report_misses():
    runs = [_run("eupmu", "three", 0.05, 0.99, 300, ttt=30.0), _run("eupmu", "seven", 0.2, 0.99, 320),
            _run("ungrad", "three", 0.0, 0.98, 500), _run("eupmu-fast", "three", 0.0, 0.97, 210),
            _run("fixed 1", "three", 0.0, 1.0, 200), _run("eupmu eps=0.1", "three", 0.05, 0.95, 300)]
    memory = [{"mode": "plain", "peak_rss_mb": 1000.0, "extra_rss_mb": 100.0},
              {"mode": "eupmu", "peak_rss_mb": 1100.0, "extra_rss_mb": 200.0},
              {"mode": "ungrad", "peak_rss_mb": 1300.0, "extra_rss_mb": 400.0}]
    s = summarise(runs, memory)
    checks = {c["target"]: c for c in s["checks"]}
    speed = checks["eupmu step <= 0.6 x ungrad step"]
    assert speed["measured"] == pytest.approx(310 / 500) and not speed["met"]  # 0.62: missed, and said so
    fast = checks["eupmu-fast step <= 1.05 x fixed step"]
    assert fast["measured"] == pytest.approx(1.05) and fast["met"]
    assert checks["eupmu peak memory <= 1.2 x plain fine-tuning (process peak)"]["met"]
    assert checks["eupmu peak memory <= 1.2 x plain fine-tuning (process peak)"]["extra_ratio"] == 2.0
    assert not checks["ungrad peak memory <= 1.2 x plain fine-tuning (process peak)"]["met"]
    default = checks["eupmu default: forget <= 10% and retain <= 3 points below base, every run"]
    assert default["measured"].startswith("1 of 2 runs; exact 95% interval of the rate [0.01, 0.99]")
    assert not default["met"]
    # an entry whose every finished run met the target, with runs still to come, has not met "every run"
    partial = [_run("eupmu", "three", 0.05, 0.99, 300)]
    for planned, met in (({"eupmu": 1}, True), ({"eupmu": 3}, False)):
        every = {c["target"]: c for c in summarise(partial, [], planned=planned)["checks"]}[
            "eupmu default: forget <= 10% and retain <= 3 points below base, every run"]
        assert every["met"] is met and every["measured"].startswith("1 of 1 runs" + ("" if met else " (3 planned)"))
    dom = checks["eupmu eps curve not dominated by the fixed weights beyond the 95% intervals"]
    assert not dom["met"] and "eupmu eps=0.1 by fixed 1" in dom["measured"]
    e = s["by_method"]["eupmu"]
    assert e["time_to_target_s"] is None and e["reached_target"] == 1  # one of two never reached it
    assert s["by_method"]["ungrad"]["backward_per_step"] == 2.0


def test_step_time_checks_use_the_interleaved_probe_when_it_ran():
    runs = [_run("eupmu", "three", 0.05, 0.99, 300), _run("ungrad", "three", 0.0, 0.98, 310),
            _run("eupmu-fast", "three", 0.0, 0.97, 400), _run("fixed 1", "three", 0.0, 1.0, 200)]
    for r in runs:  # evaluated every 50 steps; the target is met from step 100 on (never for fixed 1)
        r["curve"] = [{"step": 50, "forget_accuracy": 0.5, "retain_accuracy": 1.0},
                      {"step": 100, "forget_accuracy": 0.05 if r["label"] != "fixed 1" else 0.5,
                       "retain_accuracy": 0.99}]
    timing = [{"label": "eupmu", "mean_ms": 100.0}, {"label": "ungrad", "mean_ms": 250.0},
              {"label": "eupmu-fast", "mean_ms": 110.0}, {"label": "fixed 1", "mean_ms": 100.0}]
    checks = {c["target"]: c for c in summarise(runs, [], timing)["checks"]}
    speed = checks["eupmu step <= 0.6 x ungrad step"]
    assert speed["measured"] == pytest.approx(0.4) and speed["met"] and speed["source"].startswith("interleaved")
    assert checks["eupmu-fast step <= 1.05 x fixed step"]["measured"] == pytest.approx(1.1)
    without = {c["target"]: c for c in summarise(runs, [])["checks"]}  # the runs' own medians
    assert without["eupmu step <= 0.6 x ungrad step"]["measured"] == pytest.approx(300 / 310)
    sweep = _run("eupmu eps=0.1", "three", 0.0, 1.0, 900)
    sweep["curve"] = [{"step": 50, "forget_accuracy": 0.0, "retain_accuracy": 1.0}]
    rows = summarise(runs + [sweep], [], timing)["by_method"]
    assert rows["eupmu eps=0.1"]["probe_step_ms"] == 100.0  # eupmu's work per step, not the run's own clock
    assert rows["eupmu eps=0.1"]["probe_time_to_target_s"] == pytest.approx(5.0)
    assert rows["eupmu"]["steps_to_target"] == 100
    assert rows["eupmu"]["probe_time_to_target_s"] == pytest.approx(100 * 0.1)
    assert rows["fixed 1"]["steps_to_target"] is None and rows["fixed 1"]["probe_time_to_target_s"] is None
    md = markdown({"summary": summarise(runs, [], timing), "machine": "m", "memory": [], "runs": [],
                   "timing": [{**t, "steps_timed": 40, "median_ms": 1.5, "q1_ms": 1.0, "q3_ms": 2.0, "forget_batch_ms": 50.0,
                               "backward_per_step": 1.0} for t in timing]}, "cmd")
    assert "interleaved step-time probe" in md and "| eupmu | 40 | 100 | 2 (1-2) | 50 (50%) | 50 | 1.00 |" in md
    assert "eupmu / ungrad 0.25, eupmu-fast / fixed 1.20" in md


DOMINANCE = "eupmu eps curve not dominated by the fixed weights beyond the 95% intervals"


def _seeded(run, seed):
    return {**run, "seed": seed}


def test_dominance_is_judged_on_the_runs_both_labels_have():
    """The eps sweep runs on the first seed only: a fixed weight's mean over more concepts must not decide."""
    runs = [_run("eupmu eps=0.1", "three", 0.05, 0.99, 1), _run("fixed 1", "three", 0.06, 0.99, 1),
            _run("fixed 1", "seven", 0.0, 1.0, 1), _run("fixed 1", "one", 0.0, 1.0, 1)]
    dom = {c["target"]: c for c in summarise(runs, [])["checks"]}[DOMINANCE]
    assert dom["met"], dom  # on "three", the only common run, eps 0.1 is better than fixed 1
    # the default eupmu point belongs to the curve too
    runs = runs[:2] + [_run("eupmu", "three", 0.07, 0.99, 1)]
    dom = {c["target"]: c for c in summarise(runs, [])["checks"]}[DOMINANCE]
    assert dom["measured"].startswith("eupmu by fixed 1 (1 common run: forget 7.0% vs 6.0%, retain drop 1.00 vs "
                                      "1.00 points")


def test_dominance_needs_the_differences_beyond_their_intervals():
    """A mean that is worse on both axes dominates only when the paired differences' intervals say so."""
    # fixed 1 better on one pair, worse on the other: the means say dominated, the intervals do not
    runs = [_run("eupmu eps=0.1", "three", 0.05, 0.99, 1), _run("fixed 1", "three", 0.06, 0.99, 1),
            _run("eupmu eps=0.1", "seven", 0.2, 0.98, 1), _run("fixed 1", "seven", 0.0, 1.0, 1)]
    dom = {c["target"]: c for c in summarise(runs, [])["checks"]}[DOMINANCE]
    assert dom["met"], dom
    # better on every one of six pairs: dominated, and the intervals are reported
    runs = []
    for seed in range(6):
        runs += [_seeded(_run("eupmu eps=0.1", "three", 0.2 + 0.01 * seed, 0.97, 1), seed),
                 _seeded(_run("fixed 1", "three", 0.05, 0.99 - 0.001 * seed, 1), seed)]
    dom = {c["target"]: c for c in summarise(runs, [])["checks"]}[DOMINANCE]
    assert not dom["met"] and "6 common runs" in dom["measured"] and "95% intervals" in dom["measured"]


def test_bootstrap_intervals_are_deterministic_and_cover_the_mean():
    from concept_erase.bench import stats

    xs = [0.0, 0.0625, 0.125, 0.0, 0.25, 0.0625]
    lo, hi = stats.mean_ci(xs)
    assert lo < sum(xs) / len(xs) < hi and 0.0 <= lo and hi <= 0.25
    assert stats.mean_ci(xs) == (lo, hi)  # the same resamples every time
    assert stats.mean_ci([0.3]) == (0.3, 0.3) and stats.mean_ci([]) is None
    wide, narrow = stats.mean_ci([0.0, 1.0] * 3), stats.mean_ci([0.0, 1.0] * 30)
    assert narrow[1] - narrow[0] < 0.5 * (wide[1] - wide[0])  # more runs, a narrower interval
    assert stats.paired_difference_ci([1.0, 2.0], [1.0, 2.0]) == (0.0, 0.0)
    with pytest.raises(ValueError):
        stats.paired_difference_ci([1.0], [1.0, 2.0])


def test_rates_get_exact_intervals():
    """Clopper-Pearson: 18 of 18 is [0.815, 1], not [1, 1]; 0 of n starts at 0; the published values."""
    from concept_erase.bench import stats

    lo, hi = stats.clopper_pearson(18, 18)
    assert lo == pytest.approx(0.8147, abs=1e-4) and hi == 1.0
    assert stats.clopper_pearson(0, 10) == (0.0, pytest.approx(0.3085, abs=1e-4))
    lo, hi = stats.clopper_pearson(5, 10)  # the textbook case: [0.187, 0.813]
    assert (lo, hi) == (pytest.approx(0.1871, abs=1e-4), pytest.approx(0.8129, abs=1e-4))
    assert stats.clopper_pearson(0, 0) is None
    with pytest.raises(ValueError):
        stats.clopper_pearson(3, 2)


def test_the_bootstrap_resamples_concepts_not_runs():
    """Three runs of each of four concepts: runs of one concept agree, concepts differ. Resampling runs would treat
    the 12 as independent and give too narrow an interval; resampling concepts gives the interval of 4."""
    from concept_erase.bench import stats

    values = [v for v in (0.0, 0.1, 0.2, 0.9) for _ in range(3)]
    concepts = [c for c in "abcd" for _ in range(3)]
    by_run, by_concept = stats.mean_ci(values), stats.cluster_mean_ci(values, concepts)
    assert by_concept[1] - by_concept[0] > 1.4 * (by_run[1] - by_run[0])
    four = stats.mean_ci([0.0, 0.1, 0.2, 0.9])  # the same as four independent units
    assert by_concept == pytest.approx(four, abs=0.02)
    assert stats.cluster_mean_ci([0.5, 0.7], ["a", "a"]) == stats.mean_ci([0.5, 0.7])  # one concept: its runs
    # paired differences and ratios resample the pairs by concept too
    a, b = [1.0, 1.2, 2.0, 2.2], [2.0, 2.4, 4.0, 4.4]
    assert stats.paired_difference_ci(a, b, ["x", "x", "y", "y"])[1] < 0
    lo, hi = stats.cluster_ratio_ci(a, b, ["x", "x", "y", "y"])
    assert lo == pytest.approx(0.5) and hi == pytest.approx(0.5)  # every pair at one half


def test_held_target_counts_only_runs_at_target_from_then_to_their_end():
    def run(label, seed, curve, final_forget):
        r = _seeded(_run(label, "three", final_forget, 1.0, 100), seed)
        r["curve"] = [{"step": s, "forget_accuracy": f, "retain_accuracy": 1.0} for s, f in curve]
        return r

    runs = [run("eupmu", 0, [(50, 0.5), (100, 0.0), (150, 0.0)], 0.0),   # held from step 100
            run("eupmu", 1, [(50, 0.0), (100, 0.3), (150, 0.0)], 0.0),   # at target at 50, off at 100: held from 150
            run("eupmu", 2, [(50, 0.0), (100, 0.0), (150, 0.4)], 0.4),   # reached, then lost: not held
            run("paper", 0, [(50, 0.5), (100, 0.5), (150, 0.0)], 0.0),
            run("paper", 1, [(50, 0.5), (100, 0.0), (150, 0.0)], 0.0)]
    timing = [{"label": "eupmu", "mean_ms": 100.0}, {"label": "paper", "mean_ms": 200.0}]
    s = summarise(runs, [], timing, reference="paper")
    e = s["by_method"]["eupmu"]
    assert e["held_target"] == 2 and e["reached_target"] == 3 and e["steps_to_held_target"] == 125
    assert e["time_to_held_target_s"] == pytest.approx(12.5) and e["ci"]["steps_to_held_target"] == [100, 150]
    check = {c["target"]: c for c in s["checks"]}["eupmu time to held target <= 0.5 x paper"]
    # on the two runs both held: eupmu (10 + 15) / 2 s, paper (30 + 20) / 2 s -> 0.5, with the interval of the
    # ratio over the pairs (one concept: the runs resampled); but eupmu lost one run
    assert check["measured"].startswith("0.50 [0.33, 0.75] (12.5 s vs 25.0 s on the 2 runs both held")
    assert not check["met"] and check["ratio_ci"] == pytest.approx([1 / 3, 0.75])
    s = summarise(runs[:2] + runs[3:], [], timing, reference="paper")
    assert {c["target"]: c for c in s["checks"]}["eupmu time to held target <= 0.5 x paper"]["met"]
    # an EUPMU variant (--stop-when-erased) gets the same two checks, its erasure checks' time included
    stop = [{**run("stop", seed, [(50, 0.0)], 0.0), "method": "eupmu",
             "checks": [{"step": 0, "seconds": 1.0}, {"step": 50, "seconds": 1.0}]} for seed in (0, 1)]
    timing.append({"label": "stop", "mean_ms": 100.0})
    checks = {c["target"]: c for c in summarise(runs + stop, [], timing, reference="paper")["checks"]}
    assert checks["stop: forget <= 10% and retain <= 3 points below base, every run"]["met"]
    held = checks["stop time to held target <= 0.5 x paper"]
    assert held["measured"].startswith("0.28 [0.23, 0.35] (7.0 s vs 25.0 s on the 2 runs") and held["met"]  # (50 x 0.1 + 2) s
    assert not any(t.startswith("paper:") for t in checks)  # the reference is not its own variant
    # a probe that timed the entry's check parts charges each check what it drew, at the probe's times, not the
    # run's clock: before training a chunk and the anchors, a failed check one chunk, the stopping check all four
    # chunks and the anchors; a record with no forget_images the whole concept side and the anchors; one with
    # retain_within the anchors by the chunks drawn, a last short chunk as a whole one
    drew = [{"step": 0, "seconds": 9.0, "forget_images": 8, "retain_images": 72},
            {"step": 25, "seconds": 9.0, "forget_images": 8, "retain_images": 0},
            {"step": 50, "seconds": 9.0, "forget_images": 32, "retain_images": 72}]
    chunked = [{"step": 0, "seconds": 9.0, "forget_images": 8, "retain_images": 72, "retain_within": True},
               {"step": 25, "seconds": 9.0, "forget_images": 32, "retain_images": 24, "retain_within": False},
               {"step": 50, "seconds": 9.0, "forget_images": 32, "retain_images": 50, "retain_within": True}]
    # a record that lists its calls has each charged at the probe's time for its side and size; a size
    # the probe did not time leaves the check at its own clock
    called = [{"step": 0, "seconds": 9.0, "forget_calls": [8], "retain_calls": [72]},
              {"step": 25, "seconds": 9.0, "forget_calls": [8, 24], "retain_calls": [24]},
              {"step": 50, "seconds": 9.0, "forget_calls": [8, 24], "retain_calls": [24, 48]}]
    unprobed = [{**c, "forget_calls": [8, 5]} if c["step"] == 25 else c for c in called]  # 5: on the line
    probed = [{**run("probed", seed, [(50, 0.0)], 0.0), "method": "eupmu", "checks": drew} for seed in (0, 1)]
    by_call = [{**run("by call", seed, [(50, 0.0)], 0.0), "method": "eupmu", "checks": called} for seed in (0, 1)]
    odd_call = [{**run("odd call", seed, [(50, 0.0)], 0.0), "method": "eupmu", "checks": unprobed} for seed in (0, 1)]
    by_chunk = [{**run("by chunk", seed, [(50, 0.0)], 0.0), "method": "eupmu", "checks": chunked} for seed in (0, 1)]
    old = [{**run("old", seed, [(50, 0.0)], 0.0), "method": "eupmu", "checks": [{"step": 50, "seconds": 9.0}]}
           for seed in (0, 1)]
    parts = {"check_chunk_ms": 100.0, "check_concept_ms": 300.0, "check_anchors_ms": 1000.0,
             "check_anchor_chunk_ms": 200.0}
    parts.update(check_concept_call_ms={"8": 100.0, "24": 250.0, "32": 300.0},
                 check_anchor_call_ms={"24": 200.0, "48": 500.0, "72": 1000.0})
    timing += [{"label": label, "mean_ms": 100.0, **parts} for label in ("probed", "old", "by chunk", "by call", "odd call")]
    rows = summarise(runs + probed + old + by_chunk + by_call + odd_call, [], timing, reference="paper")["by_method"]
    # 50 steps x 0.1 s + (0.1 + 1) + 0.1 + (4 x 0.1 + 1) s
    assert rows["probed"]["time_to_held_target_s"] == pytest.approx(5 + 1.1 + 0.1 + 1.4)
    assert rows["old"]["time_to_held_target_s"] == pytest.approx(5 + 0.3 + 1.0)
    # 50 x 0.1 s + (0.1 + 3 x 0.2) + (4 x 0.1 + 0.2) + (4 x 0.1 + 3 x 0.2) s
    assert rows["by chunk"]["time_to_held_target_s"] == pytest.approx(5 + 0.7 + 0.6 + 1.0)
    # 50 x 0.1 s + (0.1 + 1) + (0.1 + 0.25 + 0.2) + (0.1 + 0.25 + 0.2 + 0.5) s
    assert rows["by call"]["time_to_held_target_s"] == pytest.approx(5 + 1.1 + 0.55 + 1.05)
    # a size the probe did not time (another concept's count) is charged on the line through the timed sizes:
    # concept calls 100, 250, 300 ms at 8, 24, 32 images: 5 images on their least-squares line
    from concept_erase.bench.report import call_cost

    line = call_cost({"8": 100.0, "24": 250.0, "32": 300.0})
    assert line(24) == 250.0 and line(8) == 100.0 and line(5) == pytest.approx(78.125)
    assert call_cost({"8": 100.0}) is None and call_cost(None) is None
    assert rows["odd call"]["time_to_held_target_s"] == pytest.approx(5 + 1.1 + (0.1 + line(5) / 1000 + 0.2) + 1.05)
    # a probe without the calls' times leaves such a record at its own clock
    no_calls = [{**t, "check_concept_call_ms": None} for t in timing if t["label"] == "by call"]
    rows = summarise(by_call, [], no_calls, reference="")["by_method"]
    assert rows["by call"]["time_to_held_target_s"] == pytest.approx(5 + 9.0 * 3)


def test_means_are_also_split_by_kind_of_concept():
    runs = [_run("fixed 1", "three", 0.0, 1.0, 200), _run("fixed 1", "seven", 0.1, 0.9, 200),
            _run("fixed 1", "red ink", 1.0, 1.0, 200)]
    from concept_erase.bench.world import world_record
    from concept_erase.digits.benchmark import WORLD

    world = world_record(WORLD, ["three", "seven", "red ink"])  # what a report stores of its world
    s = summarise(runs, [], world=world)
    assert s["by_method"]["fixed 1"]["runs"] == 3
    digit, style = s["by_kind"]["digit"]["fixed 1"], s["by_kind"]["style"]["fixed 1"]
    assert digit["runs"] == 2 and digit["forget_accuracy"] == pytest.approx(0.05)
    assert style["runs"] == 1 and style["forget_accuracy"] == 1.0 and style["meets_target"] == 0
    md = markdown({"summary": s, "machine": "m", "memory": [], "runs": [], "world": world}, "cmd")
    assert "### Digits only" in md and "### Styles only" in md
    assert not summarise(runs, [])["by_kind"]  # a report that stores no world has no tables by kind


def test_style_concepts_are_erased_relative_to_the_plain_caption():
    from concept_erase.digits.benchmark import erase_relative_to

    concepts, _ = concept_prompts("red ink")
    refs = erase_relative_to("red ink")
    assert len(refs) == len(concepts) and all(c.startswith(r + " ") for c, r in zip(concepts, refs))
    assert erase_relative_to("three") == []


def tiny_bench_file(folder, methods: list[str], *, steps: int, evaluation: str, rest: str):
    """A benchmark file for one digit and one seed, each method a few steps."""
    entries = "".join(f"  - {{method: {m}, steps: {steps}, anchor_images_per_prompt: 2, check_every: {steps}}}\n"
                      for m in methods)
    path = folder / "bench.yaml"
    path.write_text(f"recipe: {ROOT / 'pipelines' / 'digits-erase.yaml'}\nconcepts: [three]\nseeds: [0]\n"
                    f"methods:\n{entries}evaluation: {evaluation}\n{rest}")
    return path


def runs_attack(report, label, method="unlearndiff"):
    return next(a["post_attack_asr"] for r in report["runs"] if r["label"] == label for a in r["attacks"]
                if a["method"] == method)


def test_tiny_benchmark_end_to_end(tmp_path):
    """Two methods, a few steps: every per-run figure is measured and the report is written."""
    from concept_erase.cli import main

    cfg = tiny_bench_file(tmp_path, ["eupmu", "ungrad"], steps=4,
                          evaluation="{seeds: 2, final_seeds: 3, steps: 3, every: 2, tiers: true}",
                          rest="memory_probe_steps: 0\ntiming_probe: {rounds: 1, steps: 2}\n"
                               "attack: [{prompts: 1, iterations: 1, timesteps: 1}, "
                               "{method: ring-a-bell, prompts: 1, iterations: 2}]\n")
    out = tmp_path / "out"
    assert main(["bench", "--config", str(cfg), "--output", str(out), "--no-progress"]) == 0
    report = json.loads((out / "bench.json").read_text())
    # the prompt tiers: the digit in every style on every final seed, the other nine in each on 2 seeds (plain: 3)
    from concept_erase.digits.world import STYLES

    for r in report["runs"]:
        assert list(r["tiers"]) == STYLES == list(r["base_tiers"]) and r["trained_styles"] == ["plain"]
        assert [t["forget_images"] for t in r["tiers"].values()] == [3] * 5
        assert [t["retain_images"] for t in r["tiers"].values()] == [27, 18, 18, 18, 18]
        assert r["tiers"]["plain"]["forget_hits"] == r["forget_hits"]
        # the two nearest digits in each style: 2 seeds each (plain: 3), within that style's retain images
        assert [t["near_retain_images"] for t in r["tiers"].values()] == [6, 4, 4, 4, 4]
    assert "| eupmu | red ink | 0/1 |" in (out / "bench.md").read_text()
    for r in report["runs"]:  # every run's erasure attacked by both, the rates from the attack command's own results
        assert [a["method"] for a in r["attacks"]] == ["unlearndiff", "ring-a-bell"]
        for a in r["attacks"]:
            assert a["prompts"] == 1 and len(a["adversarial_prompts"]) == 1
            assert 0 <= a["pre_attack_asr"] <= a["post_attack_asr"] <= 1
        assert 0 <= r["attacks"][1]["attack_prompts_asr"] <= 1  # Ring-A-Bell's found prompts drawn on their own
    rows = report["summary"]["by_method"]
    for method in ("unlearndiff", "ring-a-bell"):
        assert rows["eupmu"]["attacks"][method]["attacked_runs"] == 1
        assert rows["eupmu"]["attacks"][method]["post_attack_asr"] == runs_attack(report, "eupmu", method)
    page = (out / "bench.md").read_text()
    assert "## Attacks on the erased models" in page and "| eupmu | ring-a-bell | 1/1 |" in page
    assert (out / "attack.png").stat().st_size > 1000
    runs = {r["label"]: r for r in report["runs"]}
    assert set(runs) == {"eupmu", "ungrad"}
    assert runs["eupmu"]["backward_passes_per_step"] == 1.0  # counted in the trainer, not assumed
    assert runs["ungrad"]["backward_passes_per_step"] == 2.0
    assert [c["step"] for c in runs["eupmu"]["curve"]] == [2, 4]
    assert [c["images"] for c in runs["eupmu"]["curve"]] == [20, 30]  # 2 images per prompt, then 3 at the end
    assert runs["eupmu"]["eval_images"] == 30 and runs["eupmu"]["forget_images"] == 3
    assert all(r["step_time_s_median"] > 0 and 0 <= r["forget_accuracy"] <= 1 for r in runs.values())
    assert report["memory"] == []  # the memory probe (a fresh process per method): its own test below
    timing = {t["label"]: t for t in report["timing"]}
    assert set(timing) == {"eupmu", "ungrad"} and all(t["steps_timed"] == 2 for t in timing.values())
    assert timing["ungrad"]["backward_per_step"] == 2.0 and timing["eupmu"]["backward_per_step"] == 1.0
    assert all(0 < t["forget_batch_ms"] < t["mean_ms"] for t in timing.values())
    # the recipe stops when erased: the probe timed each entry's check parts, at the check's sampler steps
    # (their order, a chunk under the whole side, is not asserted: one round on a loaded machine can invert it)
    assert all(t["check_inference_steps"] == 10 and all(t[k] > 0 for k in (
        "check_chunk_ms", "check_concept_ms", "check_anchor_chunk_ms", "check_anchors_ms")) for t in timing.values())
    # ... by side and images per call: every call the check makes (a first chunk, the rest, the anchors whole)
    from concept_erase.methods.stopping import ANCHOR_CHUNK, CONCEPT_CHUNK

    for t in timing.values():
        n, m = (max(int(k) for k in t[key]) for key in ("check_concept_call_ms", "check_anchor_call_ms"))
        assert {str(CONCEPT_CHUNK), str(n - CONCEPT_CHUNK), str(n)} <= set(t["check_concept_call_ms"])
        assert {str(ANCHOR_CHUNK), str(m - ANCHOR_CHUNK), str(m)} <= set(t["check_anchor_call_ms"])
        assert t["check_concept_call_ms"][str(n)] == t["check_concept_ms"] and all(
            v > 0 for key in ("check_concept_call_ms", "check_anchor_call_ms") for v in t[key].values())
    speed = {c["target"]: c for c in report["summary"]["checks"]}["eupmu step <= 0.6 x ungrad step"]
    assert speed["measured"] == pytest.approx(timing["eupmu"]["mean_ms"] / timing["ungrad"]["mean_ms"])
    md = (out / "bench.md").read_text()
    assert "eupmu step <= 0.6 x ungrad step" in md and "concept-erase bench --config" in md
    assert (out / "pareto.png").stat().st_size > 1000
    # a rerun continues: nothing is run again
    before = {p.name: p.stat().st_mtime_ns for p in (out / "runs").iterdir()}
    assert main(["bench", "--config", str(cfg), "--output", str(out), "--no-progress"]) == 0
    assert {p.name: p.stat().st_mtime_ns for p in (out / "runs").iterdir()} == before


def test_memory_probe_measures_a_fresh_process(tmp_path):
    """One mode of the benchmark's memory probe (the benchmark runs one fresh process per method), on the digits
    recipe with few anchor images."""
    import yaml

    from concept_erase.bench.memory import memory_table

    recipe = yaml.safe_load((ROOT / "pipelines" / "digits-erase.yaml").read_text())
    recipe.update(anchor_images_per_prompt=1, anchor_inference_steps=2, cache_dir=str(tmp_path / "cache"))
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    eupmu, uce = memory_table(str(tmp_path / "recipe.yaml"), ["eupmu", "uce"], 1, "three")
    assert eupmu["mode"] == "eupmu" and eupmu["peak_rss_mb"] >= eupmu["baseline_rss_mb"] > 0
    assert uce["mode"] == "uce" and uce["peak_rss_mb"] >= uce["baseline_rss_mb"] > 0  # an edit's one solve


def test_the_cost_table_gives_time_memory_and_storage_per_method():
    from concept_erase.bench.report import cost_section

    def run(label, method, concept, wall, held, size):
        return {"label": label, "method": method, "concept": concept, "train_seconds": wall - 1.0, "check_seconds": 1.0,
                "time_to_held_target_s": held, "delta_bytes": size}

    report = {"runs": [run("eupmu", "eupmu", "three", 30.0, 20.0, 2**20), run("eupmu", "eupmu", "seven", 50.0, None, 2**20),
                       run("uce", "uce", "three", 2.0, 0.1, 2**19), {**run("fixed 1", "fixed", "three", 9.0, 5.0, 0),
                                                                     "delta_bytes": None}],
              "memory": [{"mode": "eupmu", "extra_rss_mb": 123.4}, {"mode": "uce", "extra_rss_mb": 5.0}]}
    rows = {line.split(" | ")[0][2:]: line.split(" | ") for line in cost_section(report) if line.startswith("| ")}
    assert rows["eupmu"][2] == "40.00 [30.00, 50.00]" and rows["eupmu"][3].startswith("20.00") and rows["eupmu"][3].endswith("(1 of 2)")
    assert rows["eupmu"][4] == "123" and rows["eupmu"][5] == "1.00 |"
    assert rows["uce"][4] == "5" and rows["uce"][5] == "0.50 |"
    assert rows["fixed 1"][4] == "not probed" and rows["fixed 1"][5] == "not recorded |"


def test_a_failed_bench_leaves_no_empty_folders_nor_its_scratch_run(tmp_path, monkeypatch, capsys):
    from concept_erase.bench import runner as bench
    from concept_erase.cli import main
    from concept_erase.io import loading

    cfg = tiny_bench_file(tmp_path, ["eupmu"], steps=2, evaluation="{seeds: 1, steps: 2, every: 0}",
                          rest="memory_probe_steps: 0\n")
    out = tmp_path / "sub" / "out"
    real_load = loading.load_pipeline

    def broken(*a, **k):
        raise RuntimeError("the model file is damaged")

    monkeypatch.setattr(loading, "load_pipeline", broken)
    assert main(["bench", "--config", str(cfg), "--output", str(out), "--no-progress"]) == 1
    assert "the model file is damaged" in capsys.readouterr().err
    assert not (tmp_path / "sub").exists(), "a bench that failed at once left folders behind"

    monkeypatch.setattr(loading, "load_pipeline", real_load)

    def fail_in_training(*a, workdir, **k):
        (workdir / "run").mkdir(parents=True)
        (workdir / "run" / "half.bin").write_bytes(b"x")
        raise RuntimeError("out of memory")

    monkeypatch.setattr(bench, "run_one", fail_in_training)
    assert main(["bench", "--config", str(cfg), "--output", str(out), "--no-progress"]) == 1
    assert sorted(p.name for p in out.iterdir()) == ["runs"], "the scratch run outlived the failure"
    assert [p.name for p in (out / "runs").iterdir()] == ["base__three.json"]  # kept: a rerun continues from it


def test_the_package_ships_the_same_recipes_as_pipelines():
    """concept_erase/recipes/ (installed with the package) holds copies of the digits recipes and benchmark files in
    pipelines/ (the repository's): they must not drift apart."""
    from concept_erase.config import RECIPES

    shipped = sorted(p.name for p in RECIPES.glob("*.yaml"))
    assert "bench-digits.yaml" in shipped and "bench-digits-flow.yaml" in shipped
    for name in shipped:
        assert not (ROOT / "pipelines" / name).is_symlink(), f"{name}: a link breaks where a checkout has no symlinks"
        assert (RECIPES / name).read_text() == (ROOT / "pipelines" / name).read_text(), name


def test_bench_runs_on_the_recipes_model_with_its_world_and_refuses_one_without(tmp_path):
    """The benchmark's model is the recipe's; its world (concepts, prompts, judging) comes from the package that
    registers the model, and a model whose package gives none is refused before any run, naming those that do."""
    from concept_erase.digits.benchmark import WORLD
    from concept_erase.errors import UserError

    flow = load_bench(ROOT / "pipelines" / "bench-digits-flow.yaml")
    assert flow.model == "builtin:digits-flow" and flow.world is WORLD
    assert load_bench(ROOT / "pipelines" / "bench-digits.yaml").model == "builtin:digits"
    (tmp_path / "r.yaml").write_text("model: builtin:tiny\nsteps: 2\n")
    (tmp_path / "b.yaml").write_text("recipe: r.yaml\nconcepts: [three]\nmethods: [{method: eupmu}]\n")
    with pytest.raises(UserError, match="builtin:digits, builtin:digits-flow"):
        load_bench(tmp_path / "b.yaml")


def test_runs_from_another_bench_json_join_the_report(tmp_path, capsys):
    """--runs-from: a benchmark split across machines is reported whole; a run already in OUTPUT/runs is kept, a
    stored run whose settings differ from this file's entry of its label is left out, and so is an unplanned one."""
    from concept_erase.cli import main

    source = json.loads((ROOT / "benchmarks" / "defaults-bench.json").read_text())
    records = [r for r in source["runs"] if r["label"] in ("eupmu", "previous default")][:4]
    assert len(records) == 4
    records[1] = {**records[1], "beta": records[1]["beta"] + 2.0}  # not what the file plans under that label
    records.append({**records[0], "label": "an entry this file lacks"})
    (tmp_path / "other.json").write_text(json.dumps({"runs": records, "memory": [], "timing": []}))
    out = tmp_path / "out"
    (out / "runs").mkdir(parents=True)
    from concept_erase.bench.runner import _run_id

    here = {**records[2], "forget_accuracy": 0.5}  # finished here: kept, not replaced
    (out / "runs" / f"{_run_id(here['label'], here['concept'], here['seed'])}.json").write_text(json.dumps(here))
    assert main(["bench", "--config", str(ROOT / "pipelines" / "bench-digits.yaml"), "--output", str(out),
                 "--runs-from", str(tmp_path / "other.json"), "--report-only", "--no-progress"]) == 0
    said = capsys.readouterr().out
    assert "2 run(s) added" in said and "1 already there kept" in said and "1 not planned" in said
    assert f"{records[1]['label']} on {records[1]['concept']!r} seed {records[1]['seed']}" in said
    report = json.loads((out / "bench.json").read_text())
    got = {(r["label"], r["concept"], r["seed"]): r for r in report["runs"]}
    assert len(got) == 3 and (records[1]["label"], records[1]["concept"], records[1]["seed"]) not in got
    assert got[(here["label"], here["concept"], here["seed"])]["forget_accuracy"] == 0.5

    (tmp_path / "bad.json").write_text('{"runs": 3}')
    assert main(["bench", "--output", str(out), "--runs-from", str(tmp_path / "bad.json"), "--report-only"]) == 2
    assert "holds no list of runs" in capsys.readouterr().err


SPLITS = ("splits:\n  tuning: {concepts: [three, red ink], seeds: [0, 1], evaluation_seed_start: 0}\n"
          "  held_out: {concepts: [five, bold], seeds: [10], evaluation_seed_start: 1000}\n")


def test_a_file_with_splits_plans_each_split_on_its_own_seeds(tmp_path):
    from concept_erase.bench.spec import evaluation_seeds, split_of

    p = tmp_path / "b.yaml"
    p.write_text(SPLITS + "methods: [{method: eupmu}]\nevaluation: {seeds: 4, final_seeds: 8}\n")
    spec = load_bench(p)
    runs = {(concept, seed) for _, _, concept, seed in plan(spec)}
    assert runs == {("three", 0), ("three", 1), ("red ink", 0), ("red ink", 1), ("five", 10), ("bold", 10)}
    assert split_of(spec, "five").name == "held_out" and split_of(spec, "three").name == "tuning"
    assert evaluation_seeds(spec, split_of(spec, "bold")) == range(1000, 1008)


@pytest.mark.parametrize("text,message", [
    (SPLITS.replace("[five, bold]", "[five, three]"), "share the concept 'three'"),
    (SPLITS.replace("seeds: [10]", "seeds: [1]"), "share the run seed 1"),
    (SPLITS.replace("evaluation_seed_start: 1000", "evaluation_seed_start: 10"), "evaluate on the same image seeds"),
    (SPLITS.replace("held_out: {concepts: [five, bold], seeds: [10], evaluation_seed_start: 1000}", "held_out: {}"),
     "splits.held_out is empty"),
    (SPLITS.replace("held_out: {concepts: [five, bold], seeds: [10], evaluation_seed_start: 1000}", "held_out:"),
     "splits.held_out is empty"),
    (SPLITS.replace("  held_out: {concepts: [five, bold], seeds: [10], evaluation_seed_start: 1000}\n", ""),
     "exactly tuning: and held_out:"),
    (SPLITS.replace("seeds: [10]", "seeds: []"), "held_out.seeds must list at least one"),
    (SPLITS + "concepts: [three]\n", "inside splits"),
    (SPLITS.replace("evaluation_seed_start: 1000", "evaluation_seed_start: 999990"), "erasure checks draw"),
])
def test_bad_splits_are_refused_before_any_run(tmp_path, text, message):
    """Overlapping tuning and held-out splits, an empty held-out split, and evaluation seeds that a check draws."""
    p = tmp_path / "b.yaml"
    p.write_text(text + "methods: [{method: eupmu}, {method: fixed}]\nevaluation: {seeds: 4, final_seeds: 16}\n")
    with pytest.raises(UserError, match=message):
        load_bench(p)


def test_an_entry_whose_checks_draw_evaluation_seeds_is_refused(tmp_path):
    p = tmp_path / "b.yaml"
    p.write_text("concepts: [three]\nmethods: [{method: eupmu, check_seed_start: 30}]\n"
                 "evaluation: {seeds: 4, final_seeds: 64}\n")
    with pytest.raises(UserError, match="method 'eupmu': its erasure checks draw seeds 30-93, which the evaluation"):
        load_bench(p)
    p.write_text("concepts: [three]\nmethods: [{method: eupmu, check_seed_start: 30, stop_when_erased: false}]\n"
                 "evaluation: {seeds: 4, final_seeds: 16}\n")
    assert plan(load_bench(p))  # no check, nothing to keep apart


def test_no_check_draws_an_image_that_an_evaluation_judges():
    """The (caption, seed) pairs an erasure check draws and those the benchmark's and the demo's evaluations judge
    never meet, for every concept of the digits world under the shipped recipe."""
    from concept_erase.config import build_config, load_yaml
    from concept_erase.digits.benchmark import concept_prompts, judged_items
    from concept_erase.digits.world import DIGIT_NAMES, STYLES, caption
    from concept_erase.image_seeds import seed_range

    recipe = load_yaml(ROOT / "pipelines" / "digits-erase.yaml")
    spec = load_bench(ROOT / "pipelines" / "bench-heldout.yaml")
    for concept in DIGIT_NAMES + STYLES[1:]:
        concepts, anchors = concept_prompts(concept)
        config = build_config({**recipe, "concepts": concepts, "anchors": anchors, "output": "unused"})
        checked = _check_items(config)
        for split in spec.splits:
            n = max(spec.eval_seeds, spec.eval_final_seeds)
            forget, retain = judged_items(concept, n)
            evaluated = {(caption(d, s), x) for d, s, k in forget + retain
                         for x in seed_range(split.evaluation_seed_start, k)}
            assert evaluated and checked and not evaluated & checked
        demo = {(caption(d), x) for d in range(10) for x in range(16)}  # the demo's evaluation: seeds 0-15
        assert not demo & checked


def _check_items(config) -> set:
    """Every (caption, seed) a check of this run lists, without loading the judge network (it loads on first use)."""
    from concept_erase.judges import make_judge
    from concept_erase.methods.stopping import CheckSides

    sides = CheckSides(config, make_judge("digits", config.concepts, config.anchors))
    return set().union(*sides.concept_blocks) | set(sides.anchor_items)


@pytest.mark.parametrize("name", sorted(p.stem for p in (ROOT / "benchmarks").glob("*-bench.json")))
def test_a_committed_report_is_what_the_report_code_makes_of_its_json(name):
    """benchmarks/NAME.md is render(benchmarks/NAME.json): a table cannot drift from its data or from the report
    code (`python scripts/bench_report.py benchmarks/*-bench.json` rewrites them)."""
    from concept_erase.bench.pictures import stored_plots
    from concept_erase.bench.report import render

    path = ROOT / "benchmarks" / f"{name}.json"
    page = (ROOT / "benchmarks" / f"{name}.md").read_text()
    assert page == render(json.loads(path.read_text()), stored_plots(path))
    for link in re.findall(r"!\[[^]]*\]\(([^)]+)\)", page):  # every picture it shows is beside it
        assert (path.parent / link).is_file(), link


def test_the_generated_blocks_of_benchmarks_md_are_current():
    from concept_erase.bench.report import BLOCK_START, refresh_blocks

    page = (ROOT / "BENCHMARKS.md").read_text()
    assert BLOCK_START in page  # it leads with a generated table
    assert refresh_blocks(page, ROOT) == page
    assert ": tiers -->" in page and "| eupmu, two styles | bold | 0/6 |" in page  # a block of another kind
    with pytest.raises(ValueError, match="names 'everything'"):
        refresh_blocks(f"{BLOCK_START}benchmarks/variants-bench.json: everything -->\n<!-- end generated -->", ROOT)


def test_old_run_records_are_upgraded_once_and_damaged_ones_refused(tmp_path):
    from concept_erase.bench.records import RECORD_SCHEMA, upgrade

    old = {"label": "eupmu", "concept": "three", "seed": 0, "forget_accuracy": 0.0625, "retain_accuracy": 0.99,
           "base_retain_accuracy": 1.0, "meets_target": True, "forget_images": 64, "eval_images": 640}
    new = upgrade(old, "x.json")
    assert new["schema"] == RECORD_SCHEMA and new["split"] == "all" and new["commit"] is None
    assert (new["forget_hits"], new["retain_images"], new["retain_hits"]) == (4, 576, 570)
    assert new["near_retain_accuracy"] is None and upgrade(new, "x.json") == new  # once: an upgraded record stays
    signal = upgrade({**old, "schema": 3, "stop_when_erased": True, "stop_judge": "signal"}, "x.json")
    digits = upgrade({**old, "schema": 3, "stop_when_erased": True, "stop_judge": "digits"}, "x.json")
    assert signal["stop_lambda_window"] == 0 and digits["stop_lambda_window"] is None  # the signal alone, then
    assert new["delta_bytes"] is None  # not recorded before schema 6
    assert new["concept_variants"] == [] and upgrade({**old, "schema": 5, "concept_variants": ["auto"]},
                                                     "x.json")["concept_variants"] == ["auto"]
    one = {"method": "unlearndiff", "pre_attack_asr": 0.0, "post_attack_asr": 0.5}
    attacked = upgrade({**old, "schema": 6, "attack": one}, "x.json")
    assert attacked["attacks"] == [one] and "attack" not in attacked  # one attack became the list of one
    assert "attacks" not in new
    for bad, message in (({**old, "forget_accuracy": "high"}, "'forget_accuracy' is 'high'"),
                         ({k: v for k, v in old.items() if k != "meets_target"}, "'meets_target' is None"),
                         ({**old, "schema": 99}, "schema 99 is not one this version reads"),
                         ([1, 2], "is a JSON object")):
        with pytest.raises(UserError, match=message):
            upgrade(bad, "runs/x.json")


def test_bad_protocols_end_in_one_line_and_exit_2_with_nothing_written(tmp_path, capsys):
    """Overlapping splits, an empty held-out split and checks that draw evaluation seeds: refused at the door."""
    from concept_erase.cli import main

    cases = [SPLITS.replace("[five, bold]", "[five, three]"),
             SPLITS.replace("held_out: {concepts: [five, bold], seeds: [10], evaluation_seed_start: 1000}", "held_out: {}"),
             "concepts: [three]\n" + "settings: {check_seed_start: 0}\n"]
    for i, text in enumerate(cases):
        p = tmp_path / f"b{i}.yaml"
        p.write_text(text + "methods: [{method: eupmu}]\n")
        out = tmp_path / f"out{i}"
        assert main(["bench", "--config", str(p), "--output", str(out), "--no-progress"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "Traceback" not in err, err
        assert not out.exists()


def test_runs_from_refuses_a_damaged_record_and_names_the_file(tmp_path, capsys):
    from concept_erase.cli import main

    source = json.loads((ROOT / "benchmarks" / "defaults-bench.json").read_text())
    record = next(r for r in source["runs"] if r["label"] == "eupmu")
    damaged = {k: v for k, v in record.items() if k != "forget_accuracy"}
    (tmp_path / "other.json").write_text(json.dumps({"runs": [record, damaged]}))
    out = tmp_path / "out"
    assert main(["bench", "--config", str(ROOT / "pipelines" / "bench-defaults.yaml"), "--output", str(out),
                 "--runs-from", str(tmp_path / "other.json"), "--report-only", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "other.json, run 2: the run's 'forget_accuracy' is None" in err
    assert not (out / "runs").exists()  # every source is checked before anything is made: nothing half-imported
    (tmp_path / "other.json").write_text(json.dumps({"runs": [record], "memory": {"plain": 1}}))
    assert main(["bench", "--config", str(ROOT / "pipelines" / "bench-defaults.yaml"), "--output", str(out),
                 "--runs-from", str(tmp_path / "other.json"), "--report-only", "--no-progress"]) == 2
    assert "its 'memory' is not a table" in capsys.readouterr().err
    assert not (out / "runs").exists()


def _study_rows(recipe, concept, seed, points):
    return [{"kind": "evaluation", "recipe": recipe, "concept": concept, "seed": seed, "step": step, "signal": signal,
             "forget_accuracy": forget, "retain_accuracy": retain}
            for step, signal, forget, retain in points]


def test_the_signal_calibration_picks_the_highest_level_that_erases_on_average_on_every_model(tmp_path):
    from concept_erase.bench.signal import calibrate, correlations, markdown, read_study, stop_at

    rows = (_study_rows("a.yaml", "three", 0, [(0, 1.0, 1.0, 1.0), (10, 0.5, 0.8, 1.0), (20, 0.2, 0.05, 0.99),
                                               (30, 0.1, 0.0, 0.98)])
            + _study_rows("a.yaml", "seven", 0, [(0, 1.0, 1.0, 1.0), (10, 0.4, 0.3, 1.0), (20, 0.25, 0.2, 1.0),
                                                 (30, 0.1, 0.0, 0.97)])
            + _study_rows("b.yaml", "three", 0, [(0, 1.0, 1.0, 1.0), (10, 0.3, 0.0, 1.0), (20, 0.1, 0.0, 1.0)]))
    path = tmp_path / "study.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    _, runs = read_study([path])
    a = {k: v for k, v in runs.items() if k[0] == "a.yaml"}
    assert stop_at(a[("a.yaml", "seven", 0)], 0.3)["step"] == 20 and stop_at(a[("a.yaml", "seven", 0)], 0.05) is None
    levels = [0.3, 0.25, 0.2, 0.15, 0.05]
    # at 0.3 and 0.25 the mean forget where "a" stops is (0.05 + 0.2) / 2 > 10%; at 0.2 it is 2.5%
    assert calibrate({"a": a}, levels) == 0.2
    # a second model that erases early does not change it
    assert calibrate({"a": a, "b": {k: v for k, v in runs.items() if k[0] == "b.yaml"}}, levels) == 0.2
    c = correlations(a)
    assert c["points"] == 6 and c["forget"]["rho"] > 0.8
    assert "0.2" in markdown([path], "cmd", levels)


def test_the_lambda_window_delays_a_stop_while_lambda_rises_and_the_best_window_is_chosen():
    from concept_erase.bench.signal import choose_window, window_stop_at, window_summary

    evals = _study_rows("a.yaml", "three", 0, [(0, 1.0, 1.0, 1.0), (4, 0.1, 0.0, 0.90), (8, 0.1, 0.0, 0.99)])
    rising_then_falling = [0.0, 1.0, 2.0, 3.0, 3.5, 3.0, 2.5, 2.0]  # lambda after steps 1..8
    assert window_stop_at(evals, rising_then_falling, 0.15, 0)["step"] == 4  # the signal alone: at step 4
    assert window_stop_at(evals, rising_then_falling, 0.15, 2)["step"] == 8  # 3.5 > 2.0 at step 4: waits
    assert window_stop_at(evals, rising_then_falling, 0.15, 3) ["step"] == 8  # 2.0 <= 3.5 (step 5) at step 8
    assert window_stop_at(evals, rising_then_falling, 0.15, 8) is None  # no history that long yet
    runs = {("a.yaml", "three", 0): evals}
    series = {("a.yaml", "three", 0): {"lambda": rising_then_falling}}
    assert window_summary(runs, series, 0.15, 0)["at_target"] == 0  # 10 points down where it stops
    assert window_summary(runs, series, 0.15, 2)["at_target"] == 1
    assert choose_window({"a": runs}, series, 0.15, windows=[0, 2, 3]) == 2  # the smallest of the best


def test_a_delayed_stop_goes_on_to_the_factor_times_the_first_stop_step_and_past_the_study_is_not_a_stop():
    from concept_erase.bench.signal import delay_summary, delayed_stop_at

    evals = _study_rows("a.yaml", "three", 0, [(0, 1.0, 1.0, 1.0), (10, 0.1, 0.5, 0.95), (20, 0.1, 0.0, 0.99),
                                               (30, 0.1, 0.0, 1.0)])
    flat = [1.0] * 30  # lambda at rest throughout
    assert delayed_stop_at(evals, flat, 0.15, 0, 1)["step"] == 10  # the stop as it is: in the images' lag
    assert delayed_stop_at(evals, flat, 0.15, 0, 1.5)["step"] == 20  # the first evaluation at or after 15
    assert delayed_stop_at(evals, flat, 0.15, 0, 3)["step"] == 30
    assert delayed_stop_at(evals, flat, 0.15, 0, 4) is None  # step 40: after the study's last evaluation
    runs, series = {("a.yaml", "three", 0): evals}, {("a.yaml", "three", 0): {"lambda": flat}}
    assert [delay_summary(runs, series, 0.15, 0, f)["at_target"] for f in (1, 2, 4)] == [0, 1, 0]


def test_a_stop_confirmed_over_several_checks_waits_for_that_many_in_a_row():
    from concept_erase.bench.signal import confirm_summary, window_stop_at

    # the signal says erased at 10, not at 20, then at 30 and 40; the images are clean from 30 on
    evals = _study_rows("a.yaml", "three", 0, [(0, 1.0, 1.0, 1.0), (10, 0.1, 0.5, 1.0), (20, 0.3, 0.25, 1.0),
                                               (30, 0.1, 0.0, 1.0), (40, 0.1, 0.0, 1.0)])
    flat = [1.0] * 40
    assert [window_stop_at(evals, flat, 0.15, 0, n)["step"] for n in (1, 2)] == [10, 40]
    assert window_stop_at(evals, flat, 0.15, 0, 3) is None
    runs, series = {("a.yaml", "three", 0): evals}, {("a.yaml", "three", 0): {"lambda": flat}}
    assert [confirm_summary(runs, series, 0.15, 0, n)["at_target"] for n in (1, 2, 3)] == [0, 1, 0]


def test_the_committed_signal_study_report_is_what_the_report_code_makes_of_its_data():
    from concept_erase.bench.signal import markdown

    study = ROOT / "benchmarks" / "signal-study.jsonl"
    report = ROOT / "benchmarks" / "signal-study.md"
    command = "python scripts/signal_report.py benchmarks/signal-study.jsonl --output benchmarks/signal-study.md"
    assert report.read_text(encoding="utf-8") == markdown([study], command)


def test_a_sequential_benchmark_erases_one_request_after_another_and_judges_every_digit(tmp_path):
    """Two requests per method: the second continues the first (its delta holds the chain), each request's record
    judges every digit erased so far and the digits never erased, and a rerun reads the kept requests."""
    from concept_erase.cli import main
    from concept_erase.export.delta import read_delta

    cfg = tmp_path / "seq.yaml"
    cfg.write_text(f"recipe: {ROOT / 'pipelines' / 'digits-erase.yaml'}\nsequential: true\n"
                   "splits:\n  tuning: {concepts: [one], seeds: [0], evaluation_seed_start: 0}\n"
                   "  held_out: {concepts: [three, seven], seeds: [100], evaluation_seed_start: 100000}\n"
                   "methods:\n  - {method: eupmu, steps: 2, anchor_images_per_prompt: 1, stop_when_erased: false, "
                   "sampling_steps: 3, anchor_inference_steps: 3}\n"
                   "evaluation: {seeds: 2, steps: 2}\nmemory_probe_steps: 0\n")
    out = tmp_path / "out"
    assert main(["bench", "--config", str(cfg), "--output", str(out), "--seeds", "100", "--no-progress"]) == 0
    report = json.loads((out / "bench.json").read_text())
    first, second = sorted(report["runs"], key=lambda r: r["request"])
    assert (first["chain"], second["chain"]) == (["three"], ["three", "seven"])
    assert list(second["forget_by_concept"]) == ["three", "seven"] and second["forget_images"] == 4
    assert second["never_erased"] == [d for d in ("zero", "one", "two", "four", "five", "six", "eight", "nine")]
    assert second["retain_images"] == 16 and second["base_retain_accuracy"] is not None
    meta = read_delta(out / "sequences" / "eupmu__s100" / "02-seven" / "erased.safetensors", tensors=False)[1]
    assert [r["concepts"] for r in json.loads(meta["chain"])] == [["a handwritten digit three"],
                                                                  ["a handwritten digit seven"]]
    page = (out / "bench.md").read_text()
    assert "| held_out | eupmu | 2 | seven | 1 | 2 |" in page and (out / "sequence.png").stat().st_size > 1000
    stamp = (out / "sequences" / "eupmu__s100" / "02-seven" / "record.json").stat().st_mtime
    assert main(["bench", "--config", str(cfg), "--output", str(out), "--seeds", "100", "--no-progress"]) == 0
    assert (out / "sequences" / "eupmu__s100" / "02-seven" / "record.json").stat().st_mtime == stamp  # kept
    from concept_erase.bench.report import BLOCKS, render

    report = json.loads((out / "bench.json").read_text())
    assert render(report) == (out / "bench.md").read_text()
    assert BLOCKS["sequence"](report) in (out / "bench.md").read_text() and "| held_out | eupmu | 2 | seven |" in BLOCKS["sequence"](report)
    assert "sequence.png" not in render(report, plots={})  # a stored copy without its picture does not link one
    cfg.write_text(cfg.read_text().replace("steps: 2, anchor", "steps: 3, anchor"))  # the entry changed: made again
    assert main(["bench", "--config", str(cfg), "--output", str(out), "--seeds", "100", "--no-progress"]) == 0
    again = sorted(json.loads((out / "bench.json").read_text())["runs"], key=lambda r: r["request"])
    assert [(r["steps"], r["settings"]["steps_planned"]) for r in again] == [(3, 3), (3, 3)]


def test_a_later_request_records_the_checks_floor_and_a_request_made_without_it_is_made_again(tmp_path):
    """A chain's later request is checked on several concepts, so its settings name the floor of check images per
    concept; a stored request that does not name it was checked without it and differs. A setting that is None
    where the stored request lacks it (the signal stop, no stop) changes nothing."""
    import dataclasses

    from concept_erase.bench.sequence import settings_differ
    from concept_erase.bench.spec import run_config, run_settings

    spec = load_bench(ROOT / "pipelines" / "bench-sequential.yaml")
    overrides = next(m for m in spec.methods if m["method"] == "eupmu")
    config = run_config(spec, overrides, "seven", 100, tmp_path / "x", False)
    assert config.stop_when_erased
    first, later = run_settings(config), run_settings(config, chained=True)
    assert "check_images_per_concept" not in first and later["check_images_per_concept"] == 8
    assert settings_differ(first, later) == ["check_images_per_concept"]
    assert settings_differ(later, later) == [] and settings_differ(first, first) == []
    assert settings_differ({**later, "lr": 1.0}, later) == ["lr"]
    signal = dataclasses.replace(config, stop_judge="signal")
    assert "check_images_per_concept" not in run_settings(signal, chained=True)
    unchecked = dataclasses.replace(config, stop_when_erased=False)
    assert "check_images_per_concept" not in run_settings(unchecked, chained=True)
    style = run_config(spec, overrides, "red ink", 100, tmp_path / "y", False)  # ten captions, one style
    assert "check_images_per_concept" not in run_settings(style)
    assert settings_differ({k: v for k, v in first.items() if k != "hold_erasure_at"}, first) == []  # None: the same
    # a confirmed stop is another rule: the entry that asks for it is told apart from the one that does not
    confirmed = run_config(spec, next(m for m in spec.methods if m.get("check_confirm")), "seven", 100, tmp_path / "z",
                           False)
    assert settings_differ(later, run_settings(confirmed, chained=True)) == ["check_confirm"]
    assert "check_confirm" not in run_settings(dataclasses.replace(confirmed, stop_when_erased=False))


@pytest.mark.parametrize("text,message", [
    ("sequential: true\nconcepts: [three, red ink]\nmethods: [{method: eupmu}]\n", "'red ink' is not a digit"),
    ("sequential: true\nconcepts: [three, seven]\nmethods: [{method: uce}]\n", "a closed-form edit"),
    ("sequential: yes please\nconcepts: [three]\nmethods: [{method: eupmu}]\n", "sequential must be true or false"),
])
def test_a_sequential_file_that_cannot_run_is_refused(text, message, tmp_path):
    from concept_erase.errors import UserError

    path = tmp_path / "b.yaml"
    path.write_text(f"recipe: {ROOT / 'pipelines' / 'digits-erase.yaml'}\n" + text)
    with pytest.raises(UserError, match=message):
        load_bench(path)


@pytest.mark.parametrize("name", sorted(p.stem for p in (ROOT / "benchmarks").glob("many-concepts*.json")))
def test_the_committed_many_concepts_report_is_what_its_script_makes_of_its_data(name):
    """benchmarks/many-concepts*.md is `scripts/many_concepts.py`'s report of the JSON beside it."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("many_concepts", ROOT / "scripts" / "many_concepts.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    result = json.loads((ROOT / "benchmarks" / f"{name}.json").read_text())
    assert (ROOT / "benchmarks" / f"{name}.md").read_text() == script.report(result)


def test_entries_alike_but_in_eps_make_a_curve_judged_against_the_fixed_weights_alike_in_budget():
    """EUPMU entries whose runs share the stop rule and budget and differ in eps are one curve; its rivals are the
    fixed weights with the same settings, not those of another budget; its points at another eps than the default's
    are points of the curve, not entries held to the every-run target."""
    from concept_erase.bench.records import eps_curves

    def run(label, method, eps, steps, forget, retain, lam=None):
        return {**_run(label, "three", forget, retain, 100), "seed": 0, "method": method, "eps": eps,
                "lambda_init": lam, "steps_planned": steps, "stop_when_erased": steps == 400}

    runs = [run("eupmu", "eupmu", 0.0, 400, 0.0, 1.0), run("eupmu, 150 steps", "eupmu", 0.0, 150, 0.0, 0.99),
            run("eupmu, eps 0.1, 150 steps", "eupmu", 0.1, 150, 0.0, 0.7),
            run("fixed 1, 150 steps", "fixed", 0.0, 150, 0.0, 0.98, 1.0), run("fixed 1", "fixed", 0.0, 400, 0.0, 1.0, 1.0)]
    assert eps_curves(runs) == [(["eupmu, 150 steps", "eupmu, eps 0.1, 150 steps"], ["fixed 1, 150 steps"])]
    checks = {c["target"]: c for c in summarise(runs, [])["checks"]}
    curve = ("eupmu eps curve (eupmu, 150 steps, eupmu, eps 0.1, 150 steps) not dominated by fixed 1, 150 steps "
             "beyond the 95% intervals")
    assert not checks[curve]["met"]  # eps 0.1 gave way on the anchors where fixed 1 at the same budget did not
    assert checks[curve]["measured"].startswith("eupmu, eps 0.1, 150 steps by fixed 1, 150 steps")
    assert not any(t.startswith("eupmu, eps 0.1, 150 steps:") for t in checks)
    assert any(t.startswith("eupmu, 150 steps:") for t in checks)


def test_the_digits_world_gives_the_benchmark_everything_its_interface_names():
    """`bench.world.BenchWorld`'s members, each present on the digits world and consistent with its concepts: every
    digit and style is a concept of one of its kinds, the report's words are all there, and a sequential benchmark's
    kind is one of them."""
    import inspect

    from concept_erase.bench.world import BenchWorld
    from concept_erase.digits.benchmark import WORLD
    from concept_erase.digits.world import DIGIT_NAMES, STYLES

    members = {name for name, _ in inspect.getmembers(BenchWorld) if not name.startswith("_")}
    members |= set(BenchWorld.__annotations__)
    assert members and all(hasattr(WORLD, m) for m in members), members - set(dir(WORLD))
    kinds = [k for k, _ in WORLD.kinds]
    for concept in DIGIT_NAMES + STYLES[1:]:
        assert WORLD.concept_error(concept) is None and WORLD.kind(concept) in kinds
        concepts, anchors = WORLD.prompts(concept)
        assert concepts and anchors and not set(concepts) & set(anchors)
        assert WORLD.judged_images(concept, 4) > 0
    assert "neither a digit" in WORLD.concept_error("eleven") and WORLD.chain_kind in kinds
    assert {"tier", "tiers", "near", "attack_prompts", "chain"} <= set(WORLD.texts)
    assert WORLD.has_tiers("three") and not WORLD.has_tiers("red ink")
