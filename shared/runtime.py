"""Small facts about the current process, known before an Accelerator exists."""
from __future__ import annotations

import os


def launched_rank() -> int:
    """This process's rank under torchrun / accelerate launch (0 when launched alone)."""
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")))


def is_launched_main() -> bool:
    return launched_rank() == 0
