"""The package's layers: a module imports from its own layer and those below it, never from one above (the
exceptions are listed with their reason), and no modules import each other in a circle. Read from the source
(every import, at the top of a file or inside a function), so no module is imported to check it.

    commands   cli, the eval command and its metrics, attacks, the benchmark, the demo, the package's API
    training   config, methods (losses, lambda, objectives, stopping), training (the trainer and its parts)
    judging    judges, evaluation's building blocks (prompts, suites, samples, drawing, CLIP, NudeNet, FID,
               grids, reports), the digits world and its judge
    models     loading pipelines, exporting erasures (delta, diffusers, LoRA, model card), the loaders' key rules
    families   what differs between SD 1.x/2.x, SDXL, SD3 and FLUX.1
    io         atomic writes, resumable outputs, digests, tokenizers, single-file key layouts, YAML files
    core       errors, name tables, option declarations, image seeds, prompt variants, environment, processes,
               provenance, the table of models shipped in the package
"""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "concept_erase"

LAYERS = [  # bottom first; a name stands for a module or a package's every module
    ("core", ["errors", "registry", "options", "image_seeds", "variants", "env", "processes", "provenance",
              "embedded", "plugins"]),
    ("io", ["io", "io.atomic", "io.resumable", "io.tokenizer", "io.digests", "io.single_file",
            "io.tiny", "yaml_files"]),
    ("families", ["families"]),
    ("models", ["io.loading", "export"]),
    ("judging", ["judges", "evaluation", "evaluation.clip", "evaluation.nudity", "evaluation.fid", "evaluation.prompts",
                 "evaluation.sample", "evaluation.samples", "evaluation.suite", "evaluation.grids", "evaluation.report",
                 "digits", "digits.world", "digits.judge", "digits.evaluate"]),
    ("training", ["config", "methods", "training"]),
    ("commands", ["", "__main__", "cli", "evaluation.run", "evaluation.metrics", "attacks", "bench", "digits.demo",
                  "digits.metrics", "digits.model_card"]),
]

# Imports that run up the layers, each with why it stays.
EXCEPTIONS = {
}


def modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        out[".".join(p for p in parts if p != "__init__")] = path
    return out


def imports(mods: dict[str, Path]) -> dict[str, set[str]]:
    """module -> the package's modules it imports (a name imported from a package counts as that module when it
    is one)."""
    edges = {}
    for name, path in mods.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 \
                    and node.module.split(".")[0] == "concept_erase":
                base = node.module.removeprefix("concept_erase").lstrip(".")
                for alias in node.names:
                    sub = f"{base}.{alias.name}".lstrip(".")
                    found.add(sub if sub in mods else base)
            elif isinstance(node, ast.Import):
                found |= {a.name.removeprefix("concept_erase").lstrip(".") for a in node.names
                          if a.name.split(".")[0] == "concept_erase"}
        edges[name] = {m for m in found if m in mods and m != name}
    return edges


def layer_of(module: str) -> int:
    """The layer of a module: that of the longest listed name it is or lies in."""
    best, where = -1, None
    for i, (_, names) in enumerate(LAYERS):
        for n in names:
            if (module == n or n and module.startswith(n + ".") or n == "" and module == "") and len(n) > best:
                best, where = len(n), i
    assert where is not None, f"concept_erase.{module} is in no layer: add it to LAYERS"
    return where


def test_every_module_has_a_layer_and_imports_only_its_own_or_lower_ones():
    edges = imports(modules())
    upward = sorted((m, t) for m, targets in edges.items() for t in targets if layer_of(t) > layer_of(m))
    unexplained = [f"{m} -> {t} ({LAYERS[layer_of(m)][0]} -> {LAYERS[layer_of(t)][0]})"
                   for m, t in upward if (m, t) not in EXCEPTIONS]
    assert not unexplained, "imports up the layers:\n" + "\n".join(unexplained)
    stale = [pair for pair in EXCEPTIONS if pair not in upward]
    assert not stale, f"listed exceptions that no longer run upward: {stale}"


def test_the_settings_import_none_of_the_code_that_reads_them():
    """`config` checks a method, a loss or a tracker by name against the tables in `plugins`, which import their
    plug-ins only when read: the settings do not import the methods or the trainer that consume them."""
    edges = imports(modules())
    consumers = sorted(t for t in edges["config"] if t.split(".")[0] in ("methods", "training", "bench", "attacks"))
    assert not consumers, f"config imports its consumers: {consumers}"


def test_no_modules_import_each_other_in_a_circle():
    edges = imports(modules())
    index, low, stack, on, circles = {}, {}, [], set(), []

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            part = []
            while True:
                w = stack.pop()
                on.discard(w)
                part.append(w)
                if w == v:
                    break
            if len(part) > 1:
                circles.append(sorted(part))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    assert not circles, f"modules that import each other: {circles}"


START_UP = {"cli", "config", "options", "", "__main__"}  # what `concept-erase` imports before it parses its flags


def test_the_package_and_the_standard_library_are_imported_at_the_top_of_a_file():
    """Inside a function, only a heavy or optional library is imported (diffusers, matplotlib, NudeNet, ...: they
    take seconds, and a command that does not draw never loads them), or a line that says why. The start-up
    modules import the package's training and model code late, so that `concept-erase --help` and a refused flag
    answer at once."""
    import sys

    late = []
    for name, path in modules().items():
        if name in START_UP:
            continue
        source = path.read_text(encoding="utf-8")
        lines = source.splitlines()
        for fn in ast.walk(ast.parse(source)):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                if isinstance(node, ast.ImportFrom) and node.level == 0:
                    top = (node.module or "").split(".")[0]
                elif isinstance(node, ast.Import):
                    top = node.names[0].name.split(".")[0]
                else:
                    continue
                if (top == "concept_erase" or top in sys.stdlib_module_names) and "#" not in lines[node.lineno - 1]:
                    late.append(f"concept_erase.{name}:{node.lineno}: {lines[node.lineno - 1].strip()}")
    assert not late, "imports inside functions (move them to the top, or say why on the line):\n" + "\n".join(late)


# Outside the digits package, the code that names the digits world, each with why it stays.
NAMES_THE_DIGITS_WORLD = {
    "embedded": "WORLD_PACKAGES, the one list of the packages the shipped models' worlds register from",
    "cli": "the demo command runs the digits world's demo",
    "options": "the demo command's settings: its model and digit",
    "bench.records": "a value of stored run records: before schema 3 every stopping run was stopped by the digits judge",
}
WORLD_WORDS = {"digits", "digits-flow", "builtin:digits", "builtin:digits-flow",
               "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"}


def test_no_module_outside_the_digits_package_names_its_world():
    """The benchmark, the stop rule, the eval metrics and the loaders reach the digits world through the tables it
    registers into (`embedded.EMBEDDED`, `plugins.JUDGES`, `evaluation.metrics.METRICS`, `EmbeddedModel.benchmark`):
    outside `digits/` no module imports it or holds its names in code (prose in a help text or a docstring may cite
    it as an example), except the modules listed with their reason."""
    found = {}
    for name, path in modules().items():
        if name == "digits" or name.startswith("digits."):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.level == 0:
                named = [node.module or ""]
            elif isinstance(node, ast.Import):
                named = [a.name for a in node.names]
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                named = [node.value]
            else:
                continue
            for n in named:
                if n in WORLD_WORDS or n.startswith("concept_erase.digits"):
                    found.setdefault(name, []).append(f"{node.lineno}: {n!r}")
    unexplained = {m: hits for m, hits in found.items() if m not in NAMES_THE_DIGITS_WORLD}
    assert not unexplained, f"modules that name the digits world: {unexplained}"
    stale = sorted(set(NAMES_THE_DIGITS_WORLD) - set(found))
    assert not stale, f"listed modules that no longer name it: {stale}"
