"""`concept-erase` with Accelerate's own FSDP2 preparation forced on the CPU (for tests/test_sharding.py).

Accelerate enables FSDP only on CUDA; on a CPU it runs plain data parallelism over gloo. torch's FSDP2 itself
runs on a CPU over gloo, so this launcher hands the trainer's `prepare(model, optimizer)` to Accelerate's real
FSDP2 path (`Accelerator._prepare_fsdp2`, the one `accelerate launch --config_file
pipelines/accelerate-fsdp-*.yaml` takes on GPUs) with the shipped configuration's wrapping: every process
then holds a slice of each trained tensor, as on several GPUs. Run it with `accelerate launch --multi_gpu`
and ACCELERATE_USE_CPU=1; CE_FSDP_WRAP names the block classes.
"""

import os
import sys

from accelerate import Accelerator
from accelerate.utils import FullyShardedDataParallelPlugin

_plain_prepare = Accelerator.prepare


def _prepare_sharded(self, *args, **kwargs):
    models = [a for a in args if hasattr(a, "parameters") and hasattr(a, "named_modules")]
    if not models:
        return _plain_prepare(self, *args, **kwargs)
    self.state.fsdp_plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2, auto_wrap_policy="transformer_based_wrap",
        transformer_cls_names_to_wrap=os.environ["CE_FSDP_WRAP"].split(","), reshard_after_forward=True,
        cpu_ram_efficient_loading=False, state_dict_type="FULL_STATE_DICT")
    return self._prepare_fsdp2(*args)


Accelerator.prepare = _prepare_sharded

if __name__ == "__main__":
    from concept_erase.cli import main
    from concept_erase.processes import leave

    sys.exit(leave(main(sys.argv[1:])))
