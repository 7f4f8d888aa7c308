"""concept-erase: erase concepts from text-to-image diffusion models (SD 1.x/2.x, SDXL, SD3, FLUX.1)
with utility-preserving unlearning.

    from concept_erase import EraseConfig, erase, apply
    path = erase(EraseConfig(model="path/to/sd", concepts=["van gogh"], anchors=["a painting"], output="runs/vg"))
    pipe = apply(StableDiffusionPipeline.from_pretrained("path/to/sd"), path)
"""

__version__ = "0.1.0"

from concept_erase.config import EraseConfig, build_config, load_yaml
from concept_erase.errors import UserError


def erase(config, pipe=None):
    """Run an erasure; returns the path of the erased weights (see `concept_erase.training.trainer`)."""
    from concept_erase.training.trainer import erase as _erase

    return _erase(config, pipe)


def apply(pipe, path, *, allow_other_base: bool = False):
    """Apply erased weights in place to a pipeline of the model they were made from, with strict checks."""
    from concept_erase.export.delta import apply as _apply

    return _apply(pipe, path, allow_other_base=allow_other_base)


def load_pipeline(source: str, **kwargs):
    from concept_erase.io.loading import load_pipeline as _load

    return _load(source, **kwargs)


__all__ = ["EraseConfig", "build_config", "load_yaml", "erase", "apply", "load_pipeline", "UserError", "__version__"]
