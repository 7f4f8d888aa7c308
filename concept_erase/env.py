"""Process settings of the command line, and where caches go.

The library changes no environment variable: importing `concept_erase` leaves the Hub, telemetry and logging as
the caller has them. The command line (`concept-erase`, `python -m concept_erase`) applies `CLI_DEFAULTS` before
anything reads them: the Hub offline (a hub id that is not cached fails at once instead of hanging on a machine
without network), no telemetry, and diffusers' and transformers' logs at errors only. A variable already set
wins: `HF_HUB_OFFLINE=0 concept-erase ...` lets the command line download.
"""

import os
from pathlib import Path

CLI_DEFAULTS = {"HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "DIFFUSERS_VERBOSITY": "error",
                "TRANSFORMERS_VERBOSITY": "error"}


def apply_cli_defaults() -> None:
    """Set each of `CLI_DEFAULTS` the environment does not set already. The Hub reads these once, when it is first
    imported: called first thing by the command line, before any diffusers or transformers import."""
    for key, value in CLI_DEFAULTS.items():
        os.environ.setdefault(key, value)


def cache_root(given: str | None = None):
    """Where generated images, FID statistics and converted weights are cached: `given`, else
    $CONCEPT_ERASE_CACHE, else ~/.cache/concept-erase."""
    return Path(given or os.environ.get("CONCEPT_ERASE_CACHE") or Path.home() / ".cache" / "concept-erase").expanduser()
