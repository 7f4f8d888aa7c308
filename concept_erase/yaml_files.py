"""The YAML files the toolkit reads (recipes, evaluation suites, benchmark files): parsed with a key named twice
refused, a missing or malformed file said in one line with its line number, and whole-number fields checked."""

from __future__ import annotations

import math
from pathlib import Path

from concept_erase.errors import UserError


def whole_number(section: dict, key: str, default: int, where, low: int, name: str | None = None) -> int:
    """section[key] (or the default) as a whole number of at least `low`; anything else (a bool, a
    fraction, NaN, a string) is refused with a message naming `where: name`. Shared by the files
    that are not erase recipes (benchmark files, evaluation suites)."""
    value = section.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not float(value).is_integer() or value < low:
        raise UserError(f"{where}: {name or key} must be a whole number of at least {low}, not {value!r}")
    return int(value)


def read_yaml(path: Path, what: str, hint: str):
    """The parsed YAML of `path`, or a one-line UserError naming `what` (and the line) when it is
    missing or malformed. Every YAML the toolkit reads (configs, suites, benchmarks) goes through here."""
    import yaml

    if not path.is_file():
        raise UserError(f"{what} {path} does not exist; {hint}")
    try:
        return yaml.load(path.read_text(encoding="utf-8"), Loader=_unique_keys_loader())
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        where = getattr(err, "problem_mark", None)
        line = f" (line {where.line + 1})" if where is not None else ""
        if str(getattr(err, "problem", "")).startswith("duplicate key"):
            raise UserError(f"{what} {path} has the {err.problem[len('duplicate '):]} twice{line}; keep one") from None
        raise UserError(f"{what} {path} is not valid YAML{line}; {hint}") from None


def _unique_keys_loader():
    """yaml's safe loader, refusing a mapping that names a key twice (plain YAML keeps the last one silently)."""
    import yaml

    class UniqueKeys(yaml.SafeLoader):
        pass

    def mapping(loader, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = loader.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return loader.construct_mapping(node, deep)

    UniqueKeys.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, mapping)
    return UniqueKeys
