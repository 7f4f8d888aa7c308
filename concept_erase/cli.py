"""The `concept-erase` command: erase, export, sample."""

from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import signal
import sys
import threading

from .errors import UserError

LIST_FLAGS = {"concepts": "concept", "anchors": "anchor", "remap_to": "remap-to"}


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    from .config import EraseConfig

    for f in dataclasses.fields(EraseConfig):
        help_text = f.metadata.get("help", "")
        if f.name in LIST_FLAGS:
            parser.add_argument(f"--{LIST_FLAGS[f.name]}", dest=f.name, action="append", help=help_text,
                                default=argparse.SUPPRESS)
        elif f.type in ("bool", bool):
            if f.default:
                parser.add_argument(f"--no-{f.name.replace('_', '-')}", dest=f.name, action="store_false",
                                    help=f"do not: {help_text}", default=argparse.SUPPRESS)
            else:
                parser.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, action="store_true", help=help_text,
                                    default=argparse.SUPPRESS)
        else:
            names = [f"--{f.name.replace('_', '-')}"] + (["--lambda"] if f.name == "lambda_init" else [])
            kind = {"int": int, "float": float}.get(f.type if isinstance(f.type, str) else f.type.__name__, str)
            parser.add_argument(*names, dest=f.name, type=kind, help=f"{help_text} (default: {f.default!r})",
                                default=argparse.SUPPRESS, metavar=f.name.upper())


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # a usage error is a user error: one line, exit 2
        raise UserError(f"{message} (see `{self.prog} --help`)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="concept-erase", description="Erase a concept from a Stable Diffusion model while keeping "
                     "everything else it draws (implicit gradient surgery, arXiv 2510.22124).")
    parser.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)

    p = sub.add_parser("erase", help="erase one or more concepts; writes OUTPUT/erased.safetensors",
                       description="Erase concepts. Settings: defaults < --config YAML < flags.")
    p.add_argument("--config", help="YAML file of settings (keys as the flags below, dashes or underscores)")
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    _add_config_flags(p)

    p = sub.add_parser("demo", help="erase a digit from the embedded model and report before/after",
                       description="Erase one digit from the embedded digits model with EUPMU, then judge "
                                   "generations before and after: forget and retain accuracy, domain FID, a grid.")
    p.add_argument("--output", default="runs/demo", help="folder for report.md, report.json, grid.png, run/")
    p.add_argument("--digit", default="three", help="the digit to erase, by name (zero ... nine)")
    p.add_argument("--config", help="erasure recipe (default: the shipped digits-erase.yaml)")
    p.add_argument("--method", help="override the recipe's method")
    p.add_argument("--steps", type=int, help="override the recipe's steps")
    p.add_argument("--seeds", type=int, default=16, help="seeds per digit in the evaluation")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)

    p = sub.add_parser("export", help="turn a run into a diffusers pipeline folder or LoRA weights")
    p.add_argument("run", help="run folder or its erased.safetensors")
    p.add_argument("--format", choices=["diffusers", "lora", "single-file"], required=True,
                   help="diffusers: a pipeline folder; lora: LoRA weights; single-file: one original-layout "
                        ".safetensors (A1111, ComfyUI)")
    p.add_argument("--output", required=True)
    p.add_argument("--model", help="base model (default: the one the run was made from)")
    p.add_argument("--model-config", default="", help="configs for a single-file base model")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank when factoring a non-LoRA run (--format lora)")
    p.add_argument("--exact-svd", action="store_true",
                   help="factor with the exact SVD (default: randomized SVD for matrices of 256 or more rows and columns)")
    p.add_argument("--no-lora-bias", dest="lora_bias", action="store_false",
                   help="leave changed biases out of the LoRA (they are carried as lora_B.bias by default, which "
                        "load_lora_weights reads but fuse_lora and A1111 cannot use)")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--allow-other-base", action="store_true", help="apply even if the base model's digest differs")
    p.add_argument("--allow-pickle", action="store_true")
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)

    p = sub.add_parser("sample", help="generate images (optionally with erased weights) into a folder with a grid")
    p.add_argument("--model", required=True)
    p.add_argument("--weights", default="", help="erased.safetensors (or run folder) to apply")
    p.add_argument("--prompt", action="append", required=True, help="prompt (repeat for several)")
    p.add_argument("--seeds", default="0-3", help="e.g. 0-7 or 1,4,9")
    p.add_argument("--output", required=True)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--device", default="")
    p.add_argument("--model-config", default="")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--allow-other-base", action="store_true")
    p.add_argument("--allow-pickle", action="store_true")
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)

    p = sub.add_parser("eval", help="generate a suite's prompts and score them: CLIP, FID, NudeNet, judge",
                       description="Evaluate a model (optionally with erased weights) on an evaluation suite "
                                   "(eval/*.yaml). Rerunning the same command continues a half-finished evaluation.")
    p.add_argument("--suite", required=True, help="suite YAML, e.g. eval/digits.yaml")
    p.add_argument("--model", required=True, help="base model: folder, hub id, single file, or builtin:digits")
    p.add_argument("--weights", default="", help="erased.safetensors (or the run folder) to apply")
    p.add_argument("--erased", action="append", default=[],
                   help="concept value that was erased (repeat); default: the run's concepts found in the prompt set")
    p.add_argument("--output", required=True, help="folder: images/, results.json, results.md, grids/")
    p.add_argument("--seeds", type=int, default=0, help="seeds per prompt (default: the suite's)")
    p.add_argument("--limit", type=int, default=0, help="evaluate only the first N prompts (a quick look)")
    p.add_argument("--device", default="")
    p.add_argument("--clip-model", default="", help="open_clip model name for the CLIP classifiers (suite default)")
    p.add_argument("--clip-weights", default="", help="local open_clip weights file for that model")
    p.add_argument("--clip-score-model", default="", help="transformers CLIP folder (or hub id) for CLIP score")
    p.add_argument("--inception-weights", default="", help="FID Inception weights (torch-fidelity .pth or TorchScript)")
    p.add_argument("--fid-reference", default="", help="'base' or a folder of reference images (suite default)")
    p.add_argument("--cache-dir", default="", help="where FID statistics and converted weights are cached")
    p.add_argument("--model-config", default="")
    p.add_argument("--allow-pickle", action="store_true")
    p.add_argument("--allow-other-base", action="store_true")
    p.add_argument("--overwrite", action="store_true", help="replace an output that holds another evaluation")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)

    p = sub.add_parser("bench", help="benchmark the methods on the embedded digits model: quality, time, memory",
                       description="Run every method of a benchmark file on the digits model, judge each run, "
                                   "probe peak memory, and write bench.md, bench.json and pareto.png. A rerun "
                                   "continues: finished runs are kept in OUTPUT/runs/.")
    p.add_argument("--config", default="pipelines/bench-digits.yaml", help="benchmark file")
    p.add_argument("--output", default="runs/bench")
    p.add_argument("--seeds", default="", help="override the seeds, e.g. 0 or 0,1")
    p.add_argument("--concepts", default="", help="override the concepts, e.g. 'three,red ink'")
    p.add_argument("--only", action="append", default=[], help="run only this method label (repeat)")
    p.add_argument("--report-only", action="store_true", help="write the report from the finished runs; run nothing")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)

    p = sub.add_parser("compare", help="table and Pareto plot (erasure against quality) of several evaluations")
    p.add_argument("results", nargs="+", help="output folders of `concept-erase eval` (or their results.json)")
    p.add_argument("--output", required=True, help="folder for comparison.md, comparison.json, pareto.png")
    p.add_argument("--label", action="append", default=[], help="a name per evaluation, in order (repeat)")
    p.add_argument("--quality", default="retain_accuracy",
                   help="the y axis: retain_accuracy, fid, domain_fid or clip_score")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return parser


def _eval(args) -> None:
    from pathlib import Path

    from .evaluation import run_eval

    weights = args.weights
    if weights and Path(weights).is_dir():
        weights = str(Path(weights) / "erased.safetensors")
    options = {"clip_model": args.clip_model, "clip_weights": args.clip_weights,
               "clip_score_model": args.clip_score_model, "inception_weights": args.inception_weights,
               "fid_reference": args.fid_reference, "cache_dir": args.cache_dir or None,
               "allow_other_base": args.allow_other_base,
               "load": {"allow_pickle": args.allow_pickle, "model_config": args.model_config}}
    for name, value in (("--seeds", args.seeds), ("--limit", args.limit)):
        if value < 0:
            raise UserError(f"{name} must be 0 or more, not {value}")
    results = run_eval(args.suite, model=args.model, output=args.output, weights=weights, erased=args.erased,
                       overwrite=args.overwrite, device=args.device, seeds=args.seeds, limit=args.limit,
                       progress=args.progress, options=options)
    s = results["summary"]
    print(f"{results['images']} images ({results['generated_now']} generated now); "
          + ", ".join(f"{k} {v:.4g}" for k, v in s.items() if isinstance(v, (int, float))))
    print(f"report: {args.output}/results.md (results.json, grids/)")


def _bench(args) -> None:
    from .bench import run_bench

    overrides = {}
    if args.seeds:
        try:
            overrides["seeds"] = [int(x) for x in args.seeds.split(",")]
        except ValueError:
            raise UserError(f"--seeds {args.seeds!r}: give whole numbers separated by commas, e.g. 0,1") from None
    if args.concepts:
        overrides["concepts"] = [c.strip() for c in args.concepts.split(",") if c.strip()]
    report = run_bench(args.config, args.output, progress=args.progress, only=args.only or None,
                       overrides=overrides, report_only=args.report_only,
                       command="concept-erase " + " ".join(shlex.quote(a) for a in args.argv if a != "--report-only"))
    for c in report["summary"]["checks"]:
        m = c["measured"]
        print(f"{'met   ' if c['met'] else 'MISSED'} {c['target']}: {m:.3f}" if isinstance(m, float)
              else f"{'met   ' if c['met'] else 'MISSED'} {c['target']}: {m}")
    print(f"report: {args.output}/bench.md (bench.json, pareto.png)")


def _compare(args) -> None:
    from .evaluation.report import compare

    out = compare(args.results, args.output, labels=args.label or None, quality=args.quality,
                  overwrite=args.overwrite)
    print(f"comparison of {len(out['runs'])} evaluations: {args.output}/comparison.md"
          + (f", plot: {out['plot']}" if out["plot"] else ""))


def _erase(args) -> None:
    from .config import build_config, load_yaml
    from .trainer import erase

    flags = {k: v for k, v in vars(args).items() if k not in ("command", "config", "debug", "argv")}
    settings = load_yaml(args.config) if args.config else {}
    config = build_config(settings, flags, source=args.config or "config")
    path = erase(config)
    if os.environ.get("RANK", "0") == "0":
        print(f"erased weights: {path}")
        print(f"next: concept-erase sample --model {config.model} --weights {path} --prompt '{config.concepts[0]}' "
              f"--output {config.output}/samples")


def _demo(args) -> None:
    from .demo import run_demo

    overrides = {k: v for k, v in (("method", args.method), ("steps", args.steps)) if v is not None}
    report = run_demo(args.output, digit=args.digit, config_file=args.config, seeds=args.seeds,
                      overwrite=args.overwrite, progress=args.progress, overrides=overrides)
    b, a = report["before"], report["after"]
    print(f"erased '{args.digit}' with {report['method']} in {report['erase_seconds']} s")
    print(f"forget accuracy {b['forget_accuracy']:.1%} -> {a['forget_accuracy']:.1%}   "
          f"retain accuracy {b['retain_accuracy']:.1%} -> {a['retain_accuracy']:.1%}   "
          f"domain FID {b['domain_fid']:.2f} -> {a['domain_fid']:.2f}")
    print(f"targets {'met' if report['passed'] else 'MISSED'}; report: {args.output}/report.md, grid: {args.output}/grid.png")


def _export(args) -> None:
    from .export import export_diffusers, export_lora, export_single_file

    if args.format == "single-file":
        out = export_single_file(args.run, args.output, model=args.model, overwrite=args.overwrite,
                                 allow_other_base=args.allow_other_base, allow_pickle=args.allow_pickle,
                                 model_config=args.model_config)
        print(f"single-file checkpoint written to {out} (StableDiffusionPipeline.from_single_file loads it)")
    elif args.format == "diffusers":
        out = export_diffusers(args.run, args.output, model=args.model, overwrite=args.overwrite,
                               allow_other_base=args.allow_other_base, allow_pickle=args.allow_pickle,
                               model_config=args.model_config)
        print(f"pipeline written to {out} (StableDiffusionPipeline.from_pretrained loads it)")
    else:
        if args.rank < 1:
            raise UserError(f"--rank must be at least 1, not {args.rank}")
        summary = export_lora(args.run, args.output, model=args.model, rank=args.rank, overwrite=args.overwrite,
                              allow_pickle=args.allow_pickle, model_config=args.model_config, exact_svd=args.exact_svd,
                              lora_bias=args.lora_bias)
        print(f"LoRA weights written to {args.output} (pipe.load_lora_weights loads them)")
        if "max_relative_error" in summary:
            print(f"rank-{summary['rank']} factorisation: largest relative error on a weight "
                  f"{summary['max_relative_error']:.3g}; {summary['biases_carried']} changed bias(es) carried as lora_B.bias")
        if "output_change_kept" in summary:
            kept = summary["output_change_kept"]
            print(f"read back with load_lora_weights: it carries {kept:.1%} of the erasure's change in the UNet's "
                  "output (concept prompts, four timesteps)")
            if summary.get("dropped") or kept < 0.95:
                what = (f"{len(summary['dropped'])} changed tensor(s) no LoRA can hold (e.g. {summary['dropped'][0]}) "
                        "are left out" if summary.get("dropped") else "the factorisation loses part of it")
                print(f"note: {what}. For the whole erasure export --format diffusers or single-file, or use "
                      "erased.safetensors with concept_erase.apply(); or raise --rank.")


def _sample(args) -> None:
    from .sample import parse_seeds, sample

    out = sample(args.model, args.prompt, parse_seeds(args.seeds), args.output, weights=args.weights,
                 steps=args.steps, guidance=args.guidance, overwrite=args.overwrite,
                 allow_other_base=args.allow_other_base, allow_pickle=args.allow_pickle,
                 model_config=args.model_config, device=args.device)
    print(f"images written to {out} (grid: {out}/grid.png)")


def _on_sigterm(signum, frame):  # a launcher stopping this process (one rank of several died)
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
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
         "compare": _compare, "bench": _bench}[args.command](args)
        return 0
    except UserError as err:
        if debug:
            raise
        if os.environ.get("RANK", "0") == "0":
            print(f"concept-erase: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        rank = os.environ.get("RANK")
        who = f" (process {rank})" if rank is not None else ""
        print(f"concept-erase: stopped{who}; resume a run with --resume latest", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - the last line of defence: one line, never a traceback
        if debug:
            raise
        if os.environ.get("RANK", "0") == "0":
            print(f"concept-erase: error: {crash_line(err)} (rerun with --debug for the details)", file=sys.stderr)
        return 1


def crash_line(err: BaseException) -> str:
    """What failed, in one line: the error's kind and first line, and a hint for the usual causes."""
    first = (str(err).strip().splitlines() or [""])[0][:300]
    text = f"{type(err).__name__}: {first}" if first else type(err).__name__
    low = first.lower()
    if isinstance(err, MemoryError) or "out of memory" in low:
        text += "; out of memory: lower --resolution or --batch-size, add --gradient-checkpointing, or --train lora"
    return text


if __name__ == "__main__":
    sys.exit(main())
