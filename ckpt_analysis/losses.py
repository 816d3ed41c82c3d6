"""Per-token losses of scored targets (docs/jobs.md)."""

from __future__ import annotations

import torch
from torch import nn


def scored_logits(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    score_mask: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    """The logits predicting each scored target and the targets, in row-major (sequence, position)
    order. docs/jobs.md: ``score_mask[s, t]`` marks token t, predicted by the logits at t − 1.

    ``score_mask`` may also be the (sequence, position) indices of its true cells
    (:func:`~ckpt_analysis.sites.row_index`), which spares the host the wait for the device that
    finding them costs on a GPU."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    seq, pos = score_mask if isinstance(score_mask, tuple) else score_mask.nonzero(as_tuple=True)
    return logits[seq, pos - 1], input_ids[seq, pos]


def scored_token_losses(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, score_mask: torch.Tensor
) -> torch.Tensor:
    """Next-token cross-entropy of each scored target (:func:`scored_logits`' order)."""
    logits, targets = scored_logits(model, input_ids, attention_mask, score_mask)
    return nn.functional.cross_entropy(logits, targets, reduction="none")
