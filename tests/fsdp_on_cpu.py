"""`spp` for `accelerate launch` on CPU, with accelerate's FSDP device gate lifted (tests only).

accelerate 1.16 honours an FSDP config only on GPU-like devices: on CPU, AcceleratorState keeps
DistributedType.MULTI_CPU and drops the FSDP plugin, so `accelerate launch --config_file fsdp2-cpu.yaml` silently
trains with DDP (tests/test_fsdp.py shows it). torch's fully_shard itself runs on CPU with gloo, so this launcher
makes the state take the plugin as it would on a GPU, then runs the unchanged CLI: everything after that (the
Trainer, accelerate's fsdp2_prepare_model -> fully_shard per decoder block, the FSDP checkpoints, spp's gather and
merge) is the real code.

    accelerate launch --config_file recipes/launch/fsdp2-cpu.yaml tests/fsdp_on_cpu.py finetune PRUNED ...
"""

import sys
from pathlib import Path

from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType

_original_init = AcceleratorState.__init__


def _init_taking_fsdp_on_cpu(self, *args, fsdp_plugin=None, **kwargs):
    _original_init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
    if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
        self.distributed_type = DistributedType.FSDP  # what the MULTI_GPU branch of __init__ does
        self.fsdp_plugin = fsdp_plugin
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP


AcceleratorState.__init__ = _init_taking_fsdp_on_cpu

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from spp_cli.cli import run_cli

    sys.exit(run_cli(sys.argv[1:]))
