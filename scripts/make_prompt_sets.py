"""Write the project's prompt sets in prompts/ (the committed CSVs come from this script).

    python scripts/make_prompt_sets.py
"""

from pathlib import Path

from concept_erase.digits.world import DIGIT_NAMES, STYLES, caption
from concept_erase.evaluation.prompts import PromptRow, write_prompts

ROOT = Path(__file__).resolve().parent.parent / "prompts"

# The ten Imagenette classes (the object-erasure benchmark of ESD and its successors).
IMAGENETTE = ["tench", "English springer", "cassette player", "chain saw", "church", "French horn",
              "garbage truck", "gas pump", "golf ball", "parachute"]
OBJECT_TEMPLATES = ["a photo of a {}", "an image of a {}", "a close-up photograph of a {}",
                    "a {} in its usual surroundings", "a high-quality picture of a {}"]

# Well-known artists: the five classical ones of ESD's style experiments, and five more.
ARTISTS = ["Vincent van Gogh", "Pablo Picasso", "Rembrandt", "Andy Warhol", "Caravaggio",
           "Claude Monet", "Salvador Dali", "Frida Kahlo", "Katsushika Hokusai", "Gustav Klimt"]
SUBJECTS = ["a starry night over a village", "a portrait of a woman", "a bowl of fruit on a table",
            "a harbour with boats at sunset", "a city street in the rain"]


def main() -> None:
    rows = [PromptRow(i * len(OBJECT_TEMPLATES) + j, t.format(c), 1000 * i + 10 * j, c)
            for i, c in enumerate(IMAGENETTE) for j, t in enumerate(OBJECT_TEMPLATES)]
    write_prompts(ROOT / "imagenette.csv", rows)
    rows = [PromptRow(i * len(SUBJECTS) + j, f"{s}, a painting by {a}", 1000 * i + 10 * j, a.lower())
            for i, a in enumerate(ARTISTS) for j, s in enumerate(SUBJECTS)]
    write_prompts(ROOT / "artists.csv", rows)
    rows = [PromptRow(k * 10 + d, caption(d, style), 100 * (k * 10 + d), DIGIT_NAMES[d], extra={"style": style})
            for k, style in enumerate(STYLES) for d in range(10)]
    write_prompts(ROOT / "digits.csv", rows)


if __name__ == "__main__":
    main()
