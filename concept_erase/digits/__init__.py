"""The embedded digits world: its data and captions, the shipped models and their judge, judging generations,
the model card and the demo. Importing the package registers its two models (`builtin:digits`, a Stable Diffusion
UNet, and `builtin:digits-flow`, flow matching with SD3's structure) and the judge that reads both."""

from pathlib import Path

from concept_erase.digits.world import STYLE_TEMPLATES, takes_style
from concept_erase.embedded import EmbeddedModel, register

_HERE = Path(__file__).resolve().parent


def _benchmark():
    from concept_erase.digits.benchmark import WORLD  # read when a benchmark runs: registering stays light

    return WORLD


for _name, _folder, _script in (("digits", "model", "build_digits_model.py"),
                                ("digits-flow", "model-flow", "build_digits_flow_model.py")):
    register(EmbeddedModel(_name, _HERE / _folder, f"python scripts/{_script}", judge="digits",
                           templates=STYLE_TEMPLATES, takes_template=takes_style,
                           drawing={"steps": 25, "guidance": 4.0}, benchmark=_benchmark))  # eval/digits.yaml's
