"""Prompt variants: the concept inside other words, so that erasing it erases more than one prompt.

A template holds the concept's place with `{}`: "a painting of {}", "{}, oil on canvas", "{} in red ink".
Templates come in tiers (a prefix, a modifier, a longer context, a style), so that an evaluation can report
the forget and retain rates of each tier beside the bare prompt's.

- Training (`--concept-variants`) draws each concept inside its templates (the bare prompt stays one of them),
  and the anchors inside the same templates, so that "a seven in red ink" is kept while "a three in red ink"
  is erased.
- Evaluation templates that judge a run are held apart from the training ones: `GENERAL` trains,
  `GENERAL_HELD_OUT` judges. On the digits models the templates are the world's style phrases
  (`digits.world.STYLE_TEMPLATES`); a benchmark holds some of them out by training on the others.

A variants file is text, one template per line; `[tier]` on a line of its own names the tier of the lines
below it (default tier: "variant"); blank lines and lines starting with `#` are skipped.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from concept_erase.errors import UserError

SLOT = "{}"
BARE = "bare"  # the tier of the concept's own prompt
NAMED = ("auto", "general", "none")  # --concept-variants values that are not files (nor a template: '{} in red ink')

_TIER_LINE = re.compile(r"^\[([^\[\]]+)\]$")
_OTHER_BRACES = re.compile(r"\{[^{}]+\}")


@dataclass(frozen=True)
class Template:
    text: str  # holds SLOT where the concept goes
    tier: str

    def fill(self, prompt: str) -> str:
        return self.text.replace(SLOT, prompt)

    @property
    def words(self) -> str:
        """The template's own words, without the concept's slot."""
        return " ".join(self.text.replace(SLOT, " ").split())


def _templates(tiers: dict[str, list[str]]) -> tuple[Template, ...]:
    return tuple(Template(text, tier) for tier, texts in tiers.items() for text in texts)


# Templates for any model: objects ("a red car"), artists' styles ("van gogh") and nudity alike read naturally in
# them. Training draws from GENERAL; evaluations judge with GENERAL_HELD_OUT, which no training run sees.
GENERAL = _templates({
    "prefix": ["a photo of {}", "a painting of {}", "a drawing of {}"],
    "modifier": ["{}, in black and white", "{}, highly detailed", "{}, in bright colours"],
    "context": ["a picture of {}, oil on canvas, soft morning light", "{} in a wide landscape, digital art, 4k"],
})
GENERAL_HELD_OUT = _templates({
    "prefix": ["an image of {}", "a sketch of {}"],
    "modifier": ["{}, in watercolour", "{}, in sharp focus"],
    "context": ["an old photograph of {}, film grain, evening", "{} on a poster, flat design, vector art"],
})


def check_template(text: str, where: str) -> str:
    """The template's text, stripped, if it is one; a UserError naming `where` if it is not."""
    text = text.strip()
    if SLOT not in text:
        hint = " (write the slot as {} )" if _OTHER_BRACES.search(text) else ""
        raise UserError(f"{where}: the template {text!r} has no slot {{}} for the concept{hint}; every template "
                        "must hold the concept, e.g. 'a painting of {}'")
    if _OTHER_BRACES.search(text):
        raise UserError(f"{where}: the template {text!r} has a slot other than {{}}; write the concept's place as {{}}")
    if not text.replace(SLOT, "").strip(" ,.;:"):
        raise UserError(f"{where}: the template {text!r} adds no words to the concept; the bare concept is always "
                        "drawn, so leave this template out")
    return text


def read_templates(path: str | Path) -> tuple[Template, ...]:
    """The templates of a variants file (see the module's docstring), checked line by line."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"--concept-variants {path}: no such file; give a text file of templates, a template "
                        "such as 'a painting of {}', or one of " + ", ".join(NAMED))
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is None or "\x00" in text:
        raise UserError(f"--concept-variants {path} is not a text file; give one template per line, e.g. "
                        "'a painting of {}'")
    tier, found = "variant", []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        head = _TIER_LINE.match(line)
        if head:
            tier = head.group(1).strip()
            continue
        found.append(Template(check_template(line, f"{path} line {number}"), tier))
    if not found:
        raise UserError(f"--concept-variants {path} holds no template; write one per line, e.g. 'a painting of {{}}'")
    return _once(found)


def _once(templates) -> tuple[Template, ...]:
    """Each template text once, in the tier where it first appears."""
    return tuple({t.text: t for t in reversed(list(templates))}[text] for text in dict.fromkeys(t.text for t in templates))


def _named(name: str, defaults: tuple[Template, ...]) -> tuple[Template, ...]:
    if name == "none":
        return ()
    if name == "auto":
        return defaults
    if name == "general":
        return GENERAL
    if SLOT in name or _OTHER_BRACES.search(name):  # a template given as it is
        return (Template(check_template(name, "--concept-variants"), "variant"),)
    return read_templates(name)


def resolve(names: list[str], defaults: tuple[Template, ...]) -> tuple[Template, ...]:
    """The templates that `--concept-variants` names: `auto` (the model's own: `defaults`), `general` (the
    templates for any model), `none`, a template itself ('{} in red ink'), or variants files; in order, each
    template once."""
    return _once([t for name in names for t in _named(name, defaults)])


def check_names(names: list[str]) -> None:
    """At the door: `none` alone, and every other value a known name, a template or a readable variants file."""
    if "none" in names and len(names) > 1:
        raise UserError("--concept-variants none draws the bare concepts only; give it alone, or leave it out")
    for name in names:
        _named(name, ())


@dataclass(frozen=True)
class Variant:
    prompt: str
    owner: int  # the index of the prompt it varies
    tier: str
    template: str = SLOT  # the template that made it (the bare prompt's is the slot alone)

    def through_owner(self, owner_prompt: str) -> str:
        """The variant's words up to the end of its owner's prompt: where a text encoder must still be reading."""
        return self.template.split(SLOT)[0] + owner_prompt


def expand(prompts: list[str], templates: tuple[Template, ...], applies=None) -> list[Variant]:
    """Every prompt bare, then inside each template that `applies(prompt, template)` (default: every one); the same
    number of variants for every prompt where every template applies, so a uniform draw stays balanced."""
    out = [Variant(p, i, BARE) for i, p in enumerate(prompts)]
    for i, p in enumerate(prompts):
        for t in templates:
            if applies is None or applies(p, t):
                out.append(Variant(t.fill(p), i, t.tier, t.text))
    return out


def check_against_anchors(variants: list[Variant], concepts: list[str], anchors: list[str]) -> None:
    """A concept's variant may not hold an anchor word for word where the bare concept does not: it would erase
    what the anchor keeps."""
    kept = [(a, a.strip().lower()) for a in anchors if a.strip()]
    for v in variants:
        if v.tier == BARE:
            continue
        text, bare = v.prompt.lower(), concepts[v.owner].lower()
        for anchor, low in kept:
            if low in text and low not in bare:
                raise UserError(f"the variant {v.prompt!r} of the concept {concepts[v.owner]!r} holds the anchor "
                                f"{anchor!r} word for word, so erasing it would erase what the anchor keeps; "
                                "drop that template or that anchor")


def tiers(templates: tuple[Template, ...]) -> list[str]:
    """The tiers in the order they first appear, the bare prompt first."""
    return list(dict.fromkeys([BARE, *(t.tier for t in templates)]))
