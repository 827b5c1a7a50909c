"""Small facts about the current process, known before an Accelerator exists."""
from __future__ import annotations

import os

from shared.errors import UserError


def launched_rank() -> int:
    """This process's rank under torchrun / accelerate launch (0 when launched alone)."""
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")))


def is_launched_main() -> bool:
    return launched_rank() == 0


def launched_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def local_process_count() -> int:
    """Processes of this launch on this machine (they share its CPUs)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def make_accelerator(**kwargs):
    """An Accelerator that also recognises multi-process CPU launches.

    Accelerate treats `torchrun --nproc_per_node N` on a machine without CUDA as N unrelated
    single processes unless it is told `cpu=True`; then it uses gloo and a real process group.
    """
    import torch
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("true", "1"):
        raise UserError("vqprior shards the model itself (FSDP2) with its --fsdp flag: launch without --use_fsdp "
                        "(or an FSDP accelerate config) and pass --fsdp to the training command")
    if launched_world_size() > 1 and not torch.cuda.is_available():
        kwargs.setdefault("cpu", True)
    # Accelerate keeps one state per process and refuses new settings (another --mixed-precision, say)
    # for a second run in the same process (a notebook, the quickstart). Each run here starts its own
    # state; the process group (PartialState) is kept.
    AcceleratorState._reset_state(reset_partial_state=False)
    return Accelerator(**kwargs)
