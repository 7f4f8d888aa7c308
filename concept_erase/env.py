"""Process-wide settings that must be in place before diffusers or transformers is imported."""

import os

# The hub reads these once, at import: set them first so that any download fails loudly
# instead of hanging on a machine without network. A user with network can export
# HF_HUB_OFFLINE=0 to allow downloads of hub ids.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def cache_root(given: str | None = None):
    """Where generated images, FID statistics and converted weights are cached: `given`, else
    $CONCEPT_ERASE_CACHE, else ~/.cache/concept-erase."""
    from pathlib import Path

    return Path(given or os.environ.get("CONCEPT_ERASE_CACHE") or Path.home() / ".cache" / "concept-erase").expanduser()
