"""The `concept-erase` command: erase, demo, export, sample, eval, bench, compare,
attack.

Every command's settings are declared once (`options.py`, `config.EraseConfig`) and checked before
anything is written or loaded; every output is written by one process at a time (`atomic.output_lock`)
and replaced only once the new one is complete.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import sys
import threading

from concept_erase.errors import UserError

COMMANDS = {  # name: (one-line help, description)
    "erase": ("erase one or more concepts; writes OUTPUT/erased.safetensors",
              "Erase concepts. Settings: defaults < --config YAML < flags."),
    "demo": ("erase a digit from the embedded model and report before/after",
             "Erase one digit from the embedded digits model with EUPMU, then judge generations before and after: "
             "forget and retain accuracy, domain FID, a grid."),
    "export": ("turn a run into a diffusers pipeline folder, LoRA weights or a single file", None),
    "sample": ("generate images (optionally with erased weights) into a folder with a grid", None),
    "eval": ("generate a suite's prompts and score them: CLIP, FID, NudeNet, judge",
             "Evaluate a model (optionally with erased weights) on an evaluation suite (eval/*.yaml). Rerunning "
             "the same command continues a half-finished evaluation."),
    "bench": ("benchmark the methods on the embedded digits model: quality, time, memory",
              "Run every method of a benchmark file on the digits model, judge each run, probe peak memory, and "
              "write bench.md, bench.json and pareto.png. A rerun continues: finished runs are kept in OUTPUT/runs/."),
    "compare": ("table and Pareto plot (erasure against quality) of several evaluations", None),
    "attack": ("attack an erased model: how often the concept comes back (UnlearnDiffAtk, textual inversion, "
               "Ring-A-Bell)",
               "Attack an erased model with optimised prompts and report the attack success rate before and after "
               "(results.json, report.md, grid.png). Rerunning the same command continues a half-finished attack. "
               "Example: concept-erase attack --model builtin:digits --weights runs/demo/run --concept three "
               "--output runs/attack"),
}

# What a Ctrl-C leaves, per command (erase says it itself: it knows its checkpoints).
STOP_HINTS = {
    "erase": "the checkpoints written so far are kept; --resume latest continues from the last one (from step 0 "
             "if there is none)",
    "demo": "the previous demo output, if any, is unchanged; run the command again",
    "export": "nothing was written; the previous output, if any, is unchanged",
    "sample": "nothing was written; the previous output, if any, is unchanged",
    "eval": "the images generated so far are kept; run the same command again to continue",
    "bench": "finished runs are kept in OUTPUT/runs; run the same command again to continue",
    "compare": "nothing was written",
    "attack": "the prompts finished so far are kept; run the same command again to continue",
}


def _options_class(command: str):
    from concept_erase import options

    return {"export": options.ExportOptions, "sample": options.SampleOptions, "eval": options.EvalOptions,
            "demo": options.DemoOptions, "bench": options.BenchOptions, "compare": options.CompareOptions,
            "attack": options.AttackOptions}[command]


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # a usage error is a user error: one line, exit 2
        raise UserError(f"{message} (see `{self.prog} --help`)")


def build_parser() -> argparse.ArgumentParser:
    from concept_erase.config import EraseConfig
    from concept_erase.options import add_flags

    parser = _Parser(prog="concept-erase", description="Erase a concept from a text-to-image diffusion model (SD 1.x/2.x, "
                     "SDXL, SD3, FLUX.1) while keeping everything else it draws (implicit gradient surgery, arXiv 2510.22124).")
    parser.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    parser.add_argument("--version", action="version", version=f"concept-erase {_version()}")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)
    for name, (help_text, description) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=description or help_text[:1].upper() + help_text[1:],
                           epilog=_epilog(name), formatter_class=argparse.RawDescriptionHelpFormatter)
        if name == "erase":
            p.add_argument("--config", help="YAML file of settings (keys as the flags below, dashes or underscores)")
            add_flags(p, EraseConfig, suppress_defaults=True)
        else:
            add_flags(p, _options_class(name))
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="show the full traceback on errors")
    return parser


def _version() -> str:
    from importlib import metadata

    try:
        return metadata.version("concept-erase")
    except metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "(not installed)"


def _epilog(command: str) -> str | None:
    """What `--help` shows after the flags: the metrics a suite may name (eval), and an example that runs as written
    once the demo has run (`bash scripts/demo.sh`)."""
    import textwrap

    if command != "eval":
        return None
    from concept_erase.evaluation.metrics import metric_help

    lines = ["metrics (a suite's `metrics:` keys; eval/*.yaml are examples):"]
    for name, text in metric_help().items():
        lines += textwrap.wrap(text, width=100, initial_indent=f"  {name:<16}", subsequent_indent=" " * 18,
                               break_on_hyphens=False)
    lines += ["", "example (after `bash scripts/demo.sh`):",
              "  concept-erase eval --suite eval/digits.yaml --model builtin:digits --weights runs/demo/run "
              "--output runs/eval-digits",
              "several GPUs: accelerate launch --num_processes 8 -m concept_erase eval ... (the images split, one report)"]
    return "\n".join(lines)


def _opts(args, command: str):
    """The command's declared options from the parsed flags, checked at the door."""
    from concept_erase.options import check_fields, from_namespace

    opts = from_namespace(_options_class(command), args)
    check_fields(opts)
    return opts


def _check_suite_name(suite: str) -> None:
    """A suite given by name (`--suite digits`) where a file is wanted: the line names the file that exists."""
    from pathlib import Path

    if suite and not Path(suite).exists() and Path("eval").is_dir():
        shipped = sorted(p.stem for p in Path("eval").glob("*.yaml"))
        name = Path(suite).stem
        if name in shipped:
            raise UserError(f"--suite {suite} does not exist; give the suite's file: --suite eval/{name}.yaml")
        if shipped:
            raise UserError(f"--suite {suite} does not exist; give a suite YAML file, e.g. one of eval/: "
                            f"{', '.join(shipped)}")


def _eval(args) -> None:
    from concept_erase.evaluation.run import run_eval
    from concept_erase.export.delta import delta_file
    from concept_erase.options import check_device

    _check_suite_name(args.suite)
    o = _opts(args, "eval")
    check_device(o.device)
    weights = o.weights
    if weights:
        weights = str(delta_file(weights))
    options = {"clip_model": o.clip_model, "clip_weights": o.clip_weights, "clip_score_model": o.clip_score_model,
               "inception_weights": o.inception_weights, "fid_reference": o.fid_reference,
               "cache_dir": o.cache_dir or None, "allow_other_base": o.allow_other_base,
               "load": {"allow_pickle": o.allow_pickle, "model_config": o.model_config}}
    with _locked(o.output):
        results = run_eval(o.suite, model=o.model, output=o.output, weights=weights, erased=o.erased,
                           overwrite=o.overwrite, device=o.device, seeds=o.seeds_per_prompt, limit=o.limit,
                           progress=o.progress, options=options, negative_prompt=o.negative_prompt,
                           batch_size=o.batch_size, dtype=o.dtype)
    if results is None:  # another process of an `accelerate launch`: the main one reports
        return
    s = results["summary"]
    print(f"{results['images']} images ({results['generated_now']} generated now); "
          + ", ".join(f"{k} {v:.4g}" for k, v in s.items() if isinstance(v, (int, float))))
    print(f"report: {o.output}/results.md (results.json, grids/)")


def _bench(args) -> None:
    from concept_erase.bench.runner import run_bench
    from concept_erase.evaluation.sample import parse_seeds

    o = _opts(args, "bench")
    overrides = {}
    if o.seeds:  # which seeds, written as everywhere: 0,1 or 0-2 or 3
        overrides["seeds"] = parse_seeds(o.seeds)
    if o.concepts:
        overrides["concepts"] = [c.strip() for c in o.concepts.split(",") if c.strip()]
        if not overrides["concepts"]:
            raise UserError("--concepts is empty; give concepts separated by commas, e.g. 'three,red ink'")
    with _locked(o.output):
        report = run_bench(o.config, o.output, progress=o.progress, only=o.only or None, overrides=overrides,
                           report_only=o.report_only, runs_from=o.runs_from, command="concept-erase " + " ".join(
                               shlex.quote(a) for a in args.argv if a != "--report-only"))
    for c in report["summary"]["checks"]:
        m = c["measured"]
        print(f"{'met   ' if c['met'] else 'MISSED'} {c['target']}: {m:.3f}" if isinstance(m, float)
              else f"{'met   ' if c['met'] else 'MISSED'} {c['target']}: {m}")
    print(f"report: {o.output}/bench.md (bench.json, {report.get('plot', 'pareto.png')})")


def _compare(args) -> None:
    from concept_erase.evaluation.report import compare

    o = _opts(args, "compare")
    with _locked(o.output):
        out = compare(o.results, o.output, labels=o.label or None, quality=o.quality, overwrite=o.overwrite)
    print(f"comparison of {len(out['runs'])} evaluations: {o.output}/comparison.md"
          + (f", plot: {out['plot']}" if out["plot"] else ""))


def _erase(args) -> None:
    from concept_erase.config import build_config, inert_flags, load_yaml
    from concept_erase.training.trainer import erase

    flags = {k: v for k, v in vars(args).items() if k not in ("command", "config", "debug", "argv")}
    settings = load_yaml(args.config) if args.config else {}
    config = build_config(settings, flags, source=args.config or "config")
    config.check_runnable()
    path = erase(config)  # takes the output's lock itself
    if os.environ.get("RANK", "0") == "0":
        for note in inert_flags(config, flags):  # said once the run is done: a refused run prints its error alone
            print(f"concept-erase: note: {note}", file=sys.stderr)
        q = shlex.quote
        print(f"erased weights: {path}")
        print(f"next: concept-erase sample --model {q(config.model)} --weights {q(str(path))} "
              f"--prompt {q(config.concepts[0])} --output {q(config.output.rstrip('/') + '-samples')}")


def _attack(args) -> None:
    from concept_erase.attacks.run import run_attack
    from concept_erase.options import check_device

    o = _opts(args, "attack")
    check_device(o.device)
    with _locked(o.output):
        r = run_attack(model=o.model, concept=o.concept, attack=o.attack, output=o.output, weights=o.weights,
                       prompts=o.prompts, iterations=o.iterations, timesteps=o.timesteps, tokens=o.tokens,
                       judge=o.judge, prompt_file=o.prompt_file, pairs=o.pairs, steps=o.inference_steps,
                       guidance=o.guidance,
                       device=o.device,
                       overwrite=o.overwrite, allow_other_base=o.allow_other_base, progress=o.progress,
                       judge_options={"classes": o.classes, "clip_model": o.clip_model,
                                      "clip_weights": o.clip_weights, "templates": o.templates},
                       load={"allow_pickle": o.allow_pickle, "model_config": o.model_config})
    if r is None:  # another process of an `accelerate launch`: the main one reports
        return
    print(f"attack success rate on {r['prompts']} prompts: {r['pre_attack_asr']:.1%} before the attack, "
          f"{r['post_attack_asr']:.1%} after ({r['attack']})")
    print(f"report: {o.output}/report.md (results.json, grid.png)")


def _demo(args) -> None:
    from concept_erase.digits.demo import run_demo

    o = _opts(args, "demo")
    overrides = {k: v for k, v in (("model", o.model), ("method", o.method), ("steps", o.steps),
                                   ("concept_variants", o.concept_variants)) if v}
    with _locked(o.output):
        report = run_demo(o.output, digit=o.digit, config_file=o.config or None, seeds=o.seeds_per_digit,
                          overwrite=o.overwrite, progress=o.progress, overrides=overrides)
    b, a = report["before"], report["after"]
    stopped = f", stopped when erased at step {report['steps']} of {report['steps_planned']}" \
        if report.get("stopped_when_erased") else " (a closed-form edit)" if report.get("closed_form") else ""
    print(f"erased '{o.digit}' with {report['method']} in {report['erase_seconds']} s{stopped}")
    print(f"forget accuracy {b['forget_accuracy']:.1%} -> {a['forget_accuracy']:.1%}   "
          f"retain accuracy {b['retain_accuracy']:.1%} -> {a['retain_accuracy']:.1%}   "
          f"domain FID {b['domain_fid']:.2f} -> {a['domain_fid']:.2f}")
    worst = max(report["after"]["tiers"].values(), key=lambda t: t["forget_accuracy"])
    worst_style = next(s for s, t in report["after"]["tiers"].items() if t is worst)
    print(f"in every style: forget at most {worst['forget_accuracy']:.1%} ({worst_style}); targets in every style "
          f"{'met' if report['passed_every_style'] else 'MISSED'}")
    print(f"targets {'met' if report['passed'] else 'MISSED'}; report: {o.output}/report.md, grids: {o.output}/grid.png, "
          f"{o.output}/grid-styles.png")


def _export(args) -> None:
    from pathlib import Path

    from concept_erase.export import model_card
    from concept_erase.export.delta import delta_family, read_delta
    from concept_erase.options import OUT_DIR, OUT_FILE, changed_from_default, check_path

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UserError("export writes one output, so it runs as one process: run it without `accelerate launch`")
    o = _opts(args, "export")
    lora_only = changed_from_default(o, ("lora_format", "rank", "exact_svd", "lora_bias"))
    if o.format != "lora" and lora_only:
        raise UserError(f"{lora_only[0]} shapes a LoRA; add --format lora (not {o.format}) or drop {lora_only[0]}")
    if o.private and not o.push_to_hub:
        raise UserError("--private applies to --push-to-hub REPO_ID; add it or drop --private")
    check_path(o.output, OUT_FILE if o.format == "single-file" else OUT_DIR, "--output")
    if o.push_to_hub:  # before any work: a push that cannot happen is said now
        model_card.check_push(o.push_to_hub)
    results = model_card.read_eval(o.eval) if o.eval else None
    if results:
        model_card.warn_other_weights(results, o.run)
    meta = read_delta(o.run, tensors=False)[1]
    with _locked(o.output):
        weight_name = _export_files(o, delta_family(meta), meta)
        card = model_card.write_card(Path(o.output), meta, fmt=o.format, eval_dir=o.eval, weight_name=weight_name)
    print(f"model card: {card}")
    if o.push_to_hub:
        print(f"pushed to {model_card.push(Path(o.output), o.push_to_hub, private=o.private)}")


def _export_files(o, family, meta: dict) -> str:
    """Write the export itself (of a delta of `family`); the name of the weights file a loader is pointed at ('' for a
    pipeline)."""
    from concept_erase.export.formats import export_diffusers, export_lora, export_single_file

    common = {"model": o.model or None, "overwrite": o.overwrite, "allow_other_base": o.allow_other_base,
              "allow_pickle": o.allow_pickle, "model_config": o.model_config}
    if o.format == "single-file":
        out = export_single_file(o.run, o.output, **common)
        if family.denoiser_name == "transformer":
            print(f"the transformer written to {out} in its publisher's single-file layout: ComfyUI's models/unet "
                  f"(with the base's text encoders and VAE); {family.denoiser_class}.from_single_file loads it")
        else:
            print(f"single-file checkpoint written to {out} ({family.pipeline_classes[0]}.from_single_file loads it; "
                  "A1111's models/Stable-diffusion, ComfyUI's models/checkpoints)")
        return out.name
    if o.format == "diffusers":
        out = export_diffusers(o.run, o.output, **common)
        print(f"pipeline written to {out} ({family.pipeline_classes[0]}.from_pretrained loads it)")
        return ""
    summary = export_lora(o.run, o.output, rank=o.rank, exact_svd=o.exact_svd, lora_bias=o.lora_bias,
                          lora_format=o.lora_format, **common)
    _say_lora(o, summary, family, meta)
    return summary["file"] if summary["form"] == "kohya" else ""


LORA_FOLDERS = {"ComfyUI": "models/loras", "A1111": "models/Lora", "diffusers": "pipe.load_lora_weights"}


def _say_lora(o, summary: dict, family, meta: dict) -> None:
    """Where the LoRA went, which program applies how much of it, and what keeps the whole erasure."""
    programs = summary["programs"]
    places = ", ".join(f"{p} ({LORA_FOLDERS[p]})" for p in programs if p in LORA_FOLDERS)
    print(f"LoRA in {summary['form']} form written to {o.output}/{summary['file']}: {places}")
    if "max_relative_error" in summary:
        carried = (f"; {summary['biases_carried']} changed bias(es) carried as lora_B.bias"
                   if summary["form"] == "diffusers" else "")
        print(f"rank-{summary['rank']} factorisation: largest relative error on a weight "
              f"{summary['max_relative_error']:.3g}{carried}")
    print("share of the erasure's change in the denoiser's output each program applies (concept prompts, "
          "four timesteps):")
    for program, r in programs.items():
        print(f"  {program}: {r['output_change_kept']:.1%} ({r['tensors']} of {r['of']} tensors read)")
    short = [p for p, r in programs.items() if r["output_change_kept"] < 0.99]
    if not short:
        return
    print(f"note: {', '.join(short)} apply less than 99% of the erasure:")
    if summary.get("dropped"):
        print(f"  - {len(summary['dropped'])} changed tensor(s) this LoRA cannot hold are left out "
              f"(e.g. {summary['dropped'][0]})")
    for p in short:
        if programs[p]["tensors"] < programs[p]["of"]:
            print(f"  - {p} reads {programs[p]['tensors']} of the file's {programs[p]['of']} tensors")
    if summary.get("max_relative_error", 0) > 0.01:
        print(f"  - the rank-{summary['rank']} factorisation loses part of it: raise --rank")
    where = "models/unet" if family.denoiser_name == "transformer" else "a checkpoints folder"
    whole = ([f"--format single-file ({where})"] if family.single_file_layout else []) + ["--format diffusers"]
    if not meta.get("edit") and not meta.get("chain"):  # an edit does not train; a chain continues weights, not a LoRA
        whole.append("or erase with --train lora (a LoRA with no biases and nothing to factor)")
    print(f"  the whole erasure: export {', '.join(whole)}")


def _sample(args) -> None:
    from concept_erase.options import check_device
    from concept_erase.evaluation.sample import parse_seeds, sample

    o = _opts(args, "sample")
    if not o.prompt:
        raise UserError("no prompt given; pass --prompt 'a painting by van gogh' (repeat it for several)")
    seeds = parse_seeds(o.seeds)
    check_device(o.device)
    with _locked(o.output):
        out = sample(o.model, o.prompt, seeds, o.output, weights=o.weights, steps=o.inference_steps,
                     guidance=o.guidance, overwrite=o.overwrite, allow_other_base=o.allow_other_base,
                     allow_pickle=o.allow_pickle, model_config=o.model_config, device=o.device,
                     negative_prompt=o.negative_prompt, batch_size=o.batch_size, dtype=o.dtype, progress=o.progress)
    if out is not None:  # None: another process of an `accelerate launch`
        print(f"images written to {out} (grid: {out}/grid.png)")


def _locked(output: str):
    from concept_erase.io.atomic import writer_lock

    return writer_lock(output, log=lambda m: print(m, file=sys.stderr))


def _on_sigterm(signum, frame):  # a launcher stopping this process (one rank of several died)
    raise KeyboardInterrupt


def console() -> None:
    """The `concept-erase` command: `main`, then the process's exit (one of several launched processes ends
    without the interpreter's teardown, see `processes.leave`)."""
    from concept_erase.processes import leave

    sys.exit(leave(main()))


def main(argv: list[str] | None = None) -> int:
    from concept_erase.env import apply_cli_defaults

    apply_cli_defaults()  # before anything imports the Hub, diffusers or transformers
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        args = build_parser().parse_args(argv)
        if not args.command:
            build_parser().print_help()
            return 2
        args.argv = argv
        {"erase": _erase, "demo": _demo, "export": _export, "sample": _sample, "eval": _eval,
         "compare": _compare, "bench": _bench, "attack": _attack}[args.command](args)
        return 0
    except UserError as err:
        if debug:
            raise
        if os.environ.get("RANK", "0") == "0":
            print(f"concept-erase: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt as err:
        rank = os.environ.get("RANK")
        who = f" (process {rank})" if rank is not None else ""
        hint = getattr(err, "hint", None) or STOP_HINTS.get(_command(argv), "")
        print(f"concept-erase: stopped{who}" + (f"; {hint}" if hint else ""), file=sys.stderr)
        return 130
    except OSError as err:
        if debug:
            raise
        if err.filename is None:  # not about a path the user gave: unexpected
            print(f"concept-erase: error: {crash_line(err, _command(argv))} (rerun with --debug for the details)", file=sys.stderr)
            return 1
        name = str(err.filename)
        shown = name if len(name) <= 80 else name[:77] + "..."
        if os.environ.get("RANK", "0") == "0":
            print(f"concept-erase: error: cannot use {shown}: {err.strerror or err}", file=sys.stderr)
        return 2
    except Exception as err:  # noqa: BLE001 - the last line of defence: one line, never a traceback
        if debug:
            raise
        if os.environ.get("RANK", "0") == "0":
            print(f"concept-erase: error: {crash_line(err, _command(argv))} (rerun with --debug for the details)", file=sys.stderr)
        return 1


def _command(argv: list[str]) -> str:
    return next((a for a in argv if a in COMMANDS), "")


OOM_HINTS = {  # each names only flags the command has
    "erase": "lower --resolution or --batch-size, add --gradient-checkpointing, or --train lora",
    "demo": "close other programs and run it again",
    "bench": "close other programs and run it again",
    "sample": "use --device cpu, or fewer --prompt and --seeds at a time",
    "eval": "use --device cpu, or --limit N to evaluate part of the suite at a time",
    "export": "close other programs, or export on a machine with more memory",
    "attack": "use --device cpu, or fewer --tokens",
}


def crash_line(err: BaseException, command: str = "erase") -> str:
    """What failed, in one line: the error's kind and first line, and a hint for the usual causes."""
    first = (str(err).strip().splitlines() or [""])[0][:300]
    text = f"{type(err).__name__}: {first}" if first else type(err).__name__
    low = first.lower()
    if isinstance(err, MemoryError) or "out of memory" in low:
        text += "; out of memory: " + OOM_HINTS.get(command, "close other programs and run it again")
    elif "unexpected pos" in low or "no space left" in low:  # torch.save on a full disk says the former
        text += "; the disk is probably full: free some space (earlier checkpoints and outputs were left as they were)"
    return text


if __name__ == "__main__":
    sys.exit(main())
