"""Where computations run: ``checkpoints.device`` (``auto``, ``cpu``, ``cuda``) resolved to a torch device."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ckpt_analysis.errors import CheckpointError

if TYPE_CHECKING:
    import torch


def resolve_device(device: str) -> str:
    """``auto`` → ``cuda`` when available, else ``cpu``."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise CheckpointError("device = 'cuda' was asked for but CUDA is not available")
    return device


def visible_gpus(device: str) -> list[str]:
    """The GPUs a job on ``device`` may spread its local workers over: ``CUDA_VISIBLE_DEVICES``
    as set (ids or UUIDs), else every card torch sees; none when the job runs on the CPU."""
    import os

    import torch

    if device == "cpu" or not torch.cuda.is_available():
        return []
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [g.strip() for g in listed.split(",") if g.strip()]
    return [str(i) for i in range(torch.cuda.device_count())]


def to_device(array: np.ndarray, device: torch.device | str) -> torch.Tensor:
    """``array`` as a tensor on ``device``, without blocking the host.

    On CUDA the copy goes through page-locked memory with ``non_blocking=True``: a copy from
    ordinary (pageable) memory makes torch wait for the device first, one synchronisation per
    batch. Torch's pinned-memory cache keeps the staging buffer alive until the copy has run.
    """
    import torch

    tensor = torch.from_numpy(np.ascontiguousarray(array))
    if torch.device(device).type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)
