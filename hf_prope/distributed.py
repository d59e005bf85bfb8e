"""Which process this is in a multi-process run (torchrun, accelerate, DeepSpeed): rank and world size."""

from __future__ import annotations

import torch

__all__ = ["rank_and_world"]


def rank_and_world() -> tuple[int, int]:
    """``(rank, world_size)`` of this process: ``(0, 1)`` unless ``torch.distributed`` is initialised."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1
