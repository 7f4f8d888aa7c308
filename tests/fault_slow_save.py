"""Run the CLI with a checkpoint save that stalls half-way (at the step in $SLOW_SAVE_STEP), after its
weights, optimizer and rank files are written and before its state.json: a test kills it there."""

import os
import sys
import time
from pathlib import Path

import concept_erase.training.checkpoints as checkpoints

_real = checkpoints.write_json


def _stalling(target, obj):
    target = Path(target)
    if (target.name == "state.json" and target.parent.name.endswith(".tmp")
            and obj.get("step") == int(os.environ["SLOW_SAVE_STEP"])):
        Path(os.environ["SLOW_SAVE_MARKER"]).write_text("saving")
        time.sleep(120)
    return _real(target, obj)


checkpoints.write_json = _stalling

from concept_erase.cli import main  # noqa: E402

sys.exit(main(sys.argv[1:]))
