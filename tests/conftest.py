import os

# Before diffusers / transformers / huggingface_hub are imported: any download must fail loudly.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
# the command line's log levels (it sets them before diffusers is imported; tests call it in this process)
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Never the user's ~/.cache: a module-scoped fixture (made before any test's own folder exists) caches
# here; every test overrides it with a folder of its own (own_default_cache below).
import tempfile  # noqa: E402

os.environ["CONCEPT_ERASE_CACHE"] = tempfile.mkdtemp(prefix="concept-erase-test-cache-")

import copy  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(2)


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", help="run tests marked slow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: pass --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def own_default_cache(tmp_path, monkeypatch):
    """Every test, and every process it starts, caches under its own folder, never ~/.cache."""
    monkeypatch.setenv("CONCEPT_ERASE_CACHE", str(tmp_path / "default-cache"))


@pytest.fixture(scope="session")
def tiny_pipe():
    from concept_erase.io.tiny import build_tiny_pipeline

    return build_tiny_pipeline()


@pytest.fixture()
def fresh_pipe(tiny_pipe):
    """A private copy of the tiny pipeline: tests may change its weights."""
    return copy.deepcopy(tiny_pipe)


@pytest.fixture(scope="session")
def tiny_dir(tiny_pipe, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny") / "pipe"
    tiny_pipe.save_pretrained(str(path))
    return path


@pytest.fixture()
def cache_dir(tmp_path) -> Path:
    """A test's own image cache: no test may find images another test generated (a cold cache is a
    path of its own: precision, resolution and seeds all shape the images)."""
    return tmp_path / "image-cache"


@pytest.fixture()
def make_config(tiny_dir, cache_dir, tmp_path):
    """A small, fast run on the tiny model; keyword arguments override."""
    from concept_erase.config import EraseConfig

    def make(**overrides):
        settings = dict(model=str(tiny_dir), concepts=["van gogh"], anchors=["a painting", "a photo"],
                        output=str(tmp_path / "run"), steps=3, sampling_steps=4, anchor_inference_steps=2,
                        anchor_images_per_prompt=2, concept_images_per_prompt=2, cache_dir=str(cache_dir),
                        progress=False, checkpoint_every=0, lr=1e-3)
        settings.update(overrides)
        return EraseConfig(**settings)

    return make
