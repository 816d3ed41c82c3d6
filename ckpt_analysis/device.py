"""Where computations run: ``checkpoints.device`` (``auto``, ``cpu``, ``cuda``) resolved to a torch device."""

from __future__ import annotations

from ckpt_analysis.errors import CheckpointError


def resolve_device(device: str) -> str:
    """``auto`` → ``cuda`` when available, else ``cpu``."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise CheckpointError("device = 'cuda' was asked for but CUDA is not available")
    return device
